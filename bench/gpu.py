"""`make bench-gpu` (or by hand on a CUDA machine): dlm's plan against a plain TRL script on a GPU.

    python bench/gpu.py bases   OUT [--tokenizer DIR]    # random-weight SmolLM2-shaped bases (135M, 1.7B)
    python bench/gpu.py run     OUT [--steps 30]         # doctor, DoRA parity, the runs -> OUT/gpu-results.json
    python bench/gpu.py run     OUT --runs dpo:lora,dpo:dora,dpo:qlora   # DPO runs only
    python bench/gpu.py table   OUT/gpu-results.json     # the Markdown table of docs/gpu.md (also on a CPU)

Speed and memory depend on a model's shapes, not on its weights' values, so the bases are SmolLM2's
shapes (its config, tokenizer and chat template, taken from the embedded base's folder) with random
weights written in bf16: no download, and small enough to build on a machine with no network. The
corpus is made-up prose (~100k tokens) so rows fill a realistic sequence length. Each run is its own
process (`bench/worker.py`, as `make bench`); the held-out losses of random bases mean nothing and are
not reported. MFU counts 4 FLOPs per frozen parameter and 6 per trainable one per token (forward and
input gradients of the base, full training of the adapter; no recompute, no attention), against the
card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `bench` is a folder of the repository, not of the installed package

SIZES = {  # SmolLM2's shapes: the 135M config as embedded, the 1.7B one as published
    "smollm2-135m": {},
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
        "rope_parameters": {"rope_theta": 130000.0, "rope_type": "default"},
    },
}
RUNS = (("plain", "lora"), ("dlm", "lora"), ("plain", "dora"), ("dlm", "dora"), ("dlm", "qlora"))
KINDS = ("plain", "dlm", "dpo")  # dpo: dlm's plan on the preference document
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense, by card name
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def make_bases(out: Path, tokenizer: Path, sizes: list[str]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg0 = json.loads((tokenizer / "config.json").read_text())
    cfg0.pop("_model_name_or_path", None)
    for name in sizes:
        shape = SIZES[name]
        t0 = time.time()
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(LlamaConfig(**{**cfg0, **shape, "dtype": "bfloat16"})).to(torch.bfloat16)
        model.save_pretrained(folder)
        for f in TOKENIZER_FILES:
            shutil.copy(tokenizer / f, folder / f)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n / 1e6:.0f}M parameters in {time.time() - t0:.1f} s -> {folder}", flush=True)
        del model


def _corpus() -> str:
    rng = random.Random(7)
    syl = ["kel", "mar", "ros", "fen", "lum", "tor", "quin", "zel", "dun", "hir", "vey", "pel", "nor", "wyn", "ul"]

    def word() -> str:
        return "".join(rng.choice(syl) for _ in range(rng.randint(1, 3)))

    verbs, places = ["keeps", "trades", "sings", "guards", "builds"], ["river", "harbour", "tower", "market"]
    paras = [
        " ".join(
            f"The {word()} of {word().title()} {rng.choice(verbs)} {rng.randint(2, 999)} {word()}s "
            f"near the {word()} {rng.choice(places)}."
            for _ in range(6)
        )
        for _ in range(900)
    ]
    return "# A made-up chronicle\n\n" + "\n\n".join(paras) + "\n"


def _triples() -> str:
    """600 made-up preference triples: the chosen answer counts in the house's way (a number, then the
    place, then when it was counted), the rejected one is vague; ~50-70 tokens an answer."""
    rng = random.Random(11)
    syl = ["kel", "mar", "ros", "fen", "lum", "tor", "quin", "zel", "dun", "hir", "vey", "pel", "nor", "wyn", "ul"]

    def word() -> str:
        return "".join(rng.choice(syl) for _ in range(rng.randint(1, 3)))

    out = []
    for _ in range(600):
        who, what, where = (
            f"the {word()} of {word().title()}",
            f"{word()}s",
            f"the {word()} {rng.choice(['river', 'harbour', 'tower', 'market'])}",
        )
        n, days = rng.randint(2, 999), rng.randint(2, 30)
        chosen = (
            f"{who.capitalize()} keeps exactly {n} {what} near {where}. They were counted at dawn {days} days ago "
            f"by the {word()} wardens, who write every count in the {word()} ledger before the market opens. "
            f"The next count is due in {rng.randint(2, 9)} days."
        )
        rejected = (
            f"Quite a few {what}, I think, somewhere around {where}, though nobody is really sure how many there "
            f"are. It depends on the season and on who you ask; the {word()} folk say one thing and the "
            f"{word()} folk another, so any number would be a guess."
        )
        out.append(
            f"### Prompt\nHow many {what} does {who} keep near {where}?\n### Chosen\n{chosen}\n### Rejected\n{rejected}\n"
        )
    return "# Made-up counts\n\n::preference::\n" + "\n".join(out)


def write_dpo_docs(bases: Path, docs: Path) -> dict[str, Path]:
    """One DPO-only document per size (`objective: dpo`; the adapter comes from the run's config)."""
    docs.mkdir(parents=True, exist_ok=True)
    body, out = _triples(), {}
    for size in SIZES:
        name = f"{size}-dpo"
        head = f"dlm_id: 01KGP1{zlib.crc32(name.encode()):020d}\ndlm_version: 1\nbase_model: {bases / size}\n"
        (docs / f"{name}.dlm").write_text(f"---\n{head}training:\n  objective: dpo\n---\n\n{body}")
        out[size] = docs / f"{name}.dlm"
    return out


def write_docs(bases: Path, docs: Path) -> dict[tuple[str, str], Path]:
    """One document per size and adapter (no other knob: the plan is dlm's default)."""
    docs.mkdir(parents=True, exist_ok=True)
    body, out = _corpus(), {}
    for size in SIZES:
        for adapter in ("lora", "qlora", "dora"):
            name = size if adapter == "lora" else f"{size}-{adapter}"
            knobs = "" if adapter == "lora" else f"training:\n  adapter: {adapter}\n"
            head = f"dlm_id: 01KGP0{zlib.crc32(name.encode()):020d}\ndlm_version: 1\nbase_model: {bases / size}\n"
            (docs / f"{name}.dlm").write_text(f"---\n{head}{knobs}---\n\n{body}")
            out[size, adapter] = docs / f"{name}.dlm"
    return out


def _parity() -> list[dict[str, Any]]:
    """dlm's DoRA forwards against PEFT's on this device, in every dtype a plan can choose."""
    import torch

    from dlm.train import dora_fast

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    out = []
    for name, forward in (("branch", dora_fast._branch_forward), ("factored", dora_fast._factored_forward)):
        for base, adapter, autocast in ((f32, f32, None), (bf16, f32, bf16), (f16, f32, f16), (bf16, bf16, None)):
            p = dora_fast.parity_check(forward, name, base, adapter, adapter, dev, autocast=autocast)
            out.append({k: v for k, v in vars(p).items() if isinstance(v, (str, int, float, bool, type(None)))})
    return out


def run(out: Path, bases: Path, steps: int, sizes: list[str], runs: list[tuple[str, str]]) -> None:
    import torch

    from bench import harness

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    home = Path(os.environ.get("DLM_HOME") or out / "home")
    logs = Path(os.environ.get("DLM_BENCH_LOGS", "/tmp/dlm-gpu-logs"))
    logs.mkdir(parents=True, exist_ok=True)
    folder = out / "docs" if "DLM_GPU_DOCS" not in os.environ else Path(os.environ["DLM_GPU_DOCS"])
    docs, dpo_docs = write_docs(bases, folder), write_dpo_docs(bases, folder)
    names = [str(d) for d in docs.values()] + [str(d) for d in dpo_docs.values()]
    with (out / "doctor.txt").open("w") as fh:
        subprocess.run(
            [sys.executable, "-m", "dlm", "doctor", *names], stdout=fh, stderr=subprocess.STDOUT, check=False
        )
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "steps": steps,
        "parity": _parity(),
        "runs": [],
    }
    save = out / "gpu-results.json"
    save.write_text(json.dumps(results, indent=1, default=str))
    for size in sizes:
        file = str(docs[size, "lora"])
        cfg0 = {"file": file, "dropout": 0.0, "steps": steps, "home": str(home)}
        plan = [{"kind": "prepare", "adapter": "lora", **cfg0}]
        plan += [
            {"kind": k, "adapter": a, "size": size, **cfg0, **({"file": str(dpo_docs[size])} if k == "dpo" else {})}
            for k, a in runs
        ]
        for cfg in plan:
            r = harness.run_one(cfg, logs, timeout=300)
            results["runs"].append(r)
            save.write_text(json.dumps(results, indent=1, default=str))
            print(f"[{time.time() - t0:5.0f} s] {cfg['kind']} {cfg['adapter']} {size}: {_line(r)}", flush=True)
    print(table(results))


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return "FAILED " + r["error"][-300:]
    if "steady_s" not in r:
        return "ok"
    tps = f"{r['tokens_per_s']:.0f} tok/s" if r.get("tokens_per_s") else "tok/s n/a"
    est = f" (est. {r['est_step_s']:.3f})" if r.get("est_step_s") else ""
    return f"{r['steady_s']:.3f} s/step{est}, {tps}, peak {r['peak_bytes'] / 2**30:.2f} GiB"


def _flops_per_token(size: str, adapter_params: int) -> float:
    from dlm.plan import bases

    cfg = {**bases.ALIASES["smollm2-135m"].config, **SIZES[size]}
    return 4 * bases.count_params(cfg) + 6 * adapter_params


def table(results: dict[str, Any]) -> str:
    """The Markdown table: per size and adapter, plain and dlm side by side."""
    from dlm.plan import bases
    from dlm.plan.estimates import adapter_shape

    peak = next((v for k, v in BF16_PEAK.items() if k in results["gpu"]), None)
    rows = [
        "| base shape | adapter | run | micro x accum | checkpointing | s/step (est.) | tokens/s | MFU | "
        "peak GiB (est.) | dlm / plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    done = [r for r in results["runs"] if "steady_s" in r]
    for r in done:
        c = r["config"]
        size, adapter = c["size"], c["adapter"]
        facts = bases._facts(size, "folder", size, {**bases.ALIASES["smollm2-135m"].config, **SIZES[size]}, None)
        ad = adapter_shape(facts, list(bases.LLAMA_LINEAR), 8, adapter == "dora", False)
        mfu = r["tokens_per_s"] * _flops_per_token(size, ad.params) / peak if peak and r.get("tokens_per_s") else None
        plain = next(
            (
                p
                for p in done
                if p["config"]["kind"] == "plain" and p["config"]["adapter"] == adapter and p["config"]["size"] == size
            ),
            None,
        )
        gain = f"x{r['tokens_per_s'] / plain['tokens_per_s']:.2f}" if plain and c["kind"] == "dlm" else ""
        est_s = f" ({r['est_step_s']:.2f})" if r.get("est_step_s") else ""
        est_m = f" ({r['est_peak_bytes'] / 2**30:.1f})" if r.get("est_peak_bytes") else ""
        if c["kind"] == "dpo":  # two sequences a row and the reference forward: the FLOPs above do not apply
            mfu = None
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "n/a"
        rows.append(
            f"| {size} | {adapter} | {c['kind']} | {r['micro']} x {r['accum']} | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['steady_s']:.3f}{est_s} | {tps} | {f'{mfu:.1%}' if mfu else 'n/a'} "
            f"| {r['peak_bytes'] / 2**30:.2f}{est_m} | {gain} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("bases", "run", "table"))
    ap.add_argument("path", type=Path)
    ap.add_argument("--tokenizer", type=Path, help="a SmolLM2-135M folder (default: the embedded base's)")
    ap.add_argument("--bases", type=Path, help="for run: the folder `bases` wrote (default: PATH/bases)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"for run: some of {', '.join(SIZES)}")
    ap.add_argument("--runs", default=",".join(f"{k}:{a}" for k, a in RUNS), help="for run: kind:adapter,...")
    args = ap.parse_args()
    if args.what == "table":
        print(table(json.loads(args.path.read_text())))
    elif args.what == "bases":
        tok = args.tokenizer
        if tok is None:
            from dlm.plan import bases
            from dlm.train import basefolder

            tok = basefolder.materialize(bases.resolve("smollm2-135m"), Path(os.environ.get("DLM_HOME", ".dlm-home")))
        make_bases(args.path, tok, [s for s in args.sizes.split(",") if s in SIZES])
    else:
        sizes = [s for s in args.sizes.split(",") if s]
        runs = [(k, a) for k, _, a in (r.partition(":") for r in args.runs.split(",") if r)]
        unknown = [s for s in sizes if s not in SIZES] + [f"{k}:{a}" for k, a in runs if k not in KINDS]
        if unknown:
            ap.error(f"unknown: {', '.join(unknown)}")
        run(args.path, args.bases or args.path / "bases", args.steps, sizes, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
