"""`make learn`: does `dlm train` with no knobs learn a document? The recall table of docs/learning.md.

    .venv/bin/python bench/learn/learn.py [DOC ...] [--variants dlm,peers] [--md docs/learning.md]

For each made-up fact document (bench/learn/*.dlm, written by make_docs.py) and each variant, one
`dlm train --fresh` in its own process and its own DLM_HOME (the converted base is shared), timed
from the command's start to its end, then the version's learning report (metrics.json) is read:
training answers matched (F1 >= 0.8), training and held-out answer F1 for the adapter and the base.
Variants:
- `dlm`: the document as it is, no training knobs: dlm's defaults and the planner's budget;
- `peers`: the usual defaults of peer tools written into the document (3 epochs, learning rate
  2e-4, LoRA r=8 on the attention projections q/k/v/o, effective batch 8).
The prose-only document has no Q/A: its probes (prose-probes.tsv) are sentence openings whose
greedy continuation must carry the fact, scored the same way, for the adapter and the base.
Prints a line per run and writes the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DLM = str(Path(sys.executable).with_name("dlm"))
PEERS = {
    "training.learning_rate": "2e-4",
    "training.num_epochs": "3",
    "training.lora_r": "8",
    "training.lora_alpha": "16",
    "training.target_modules": "[q_proj, k_proj, v_proj, o_proj]",
    "training.micro_batch_size": "4",
    "training.grad_accum": "2",
}


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "DLM_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _home(work: Path) -> Path:
    """A fresh DLM_HOME whose converted bases are the repository's own (converted once)."""
    home = work / "home"
    home.mkdir(parents=True)
    shared = Path(os.environ.get("DLM_HOME") or REPO / ".dlm-home") / "bases"
    shared.mkdir(parents=True, exist_ok=True)
    (home / "bases").symlink_to(shared)
    return home


def _variant_doc(doc: Path, variant: str, work: Path, home: Path) -> Path:
    """The document as it is (`dlm`), or with peers' knobs written into a `training:` block (`peers`)."""
    copy = work / doc.name
    text = doc.read_text()
    if variant == "peers":
        head, sep, body = text.partition("\n---\n")
        assert "\ntraining:" not in head, "the fact documents carry no training knobs"
        knobs = "".join(f"  {k.split('.', 1)[1]}: {v}\n" for k, v in PEERS.items())
        text = f"{head}\ntraining:\n{knobs.rstrip()}{sep}{body}"
    copy.write_text(text)
    return copy


def _probe(doc: Path, home: Path) -> dict:
    """prose.dlm: greedy continuations of the probe openings, adapter and base, scored by token F1."""
    code = r"""
import json, sys
from pathlib import Path
from dlm.store.current import current
from dlm.train import basefolder
from dlm.train.learning import LEARNED_F1, token_f1
from dlm.use.infer import load_trained
import torch
cur = current(sys.argv[1], Path(sys.argv[2]))
model, tok = load_trained(cur.version_dir, basefolder.materialize(cur.prepared.base, Path(sys.argv[2])), merge=False)
probes = [l.split("\t") for l in Path(sys.argv[3]).read_text().splitlines() if l.strip()]
def cont(prefix):
    enc = tok(text=prefix, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split(".")[0]
rows = []
for opening, tail in probes:
    a = cont(opening)
    with model.disable_adapter():
        b = cont(opening)
    rows.append((token_f1(a, tail.strip()), token_f1(b, tail.strip())))
n = len(rows)
print(json.dumps({"n": n, "learned": sum(a >= LEARNED_F1 for a, _ in rows), "f1": sum(a for a, _ in rows) / n,
                  "base_f1": sum(b for _, b in rows) / n}))
"""
    res = subprocess.run(
        [sys.executable, "-c", code, str(doc), str(home), str(HERE / "prose-probes.tsv")],
        capture_output=True,
        text=True,
        env=_env(home),
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_one(doc: Path, variant: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"learn-{doc.stem}-{variant}-"))
    try:
        home = _home(work)
        path = _variant_doc(doc, variant, work, home)
        t0 = time.time()
        proc = subprocess.run(
            [DLM, "-q", "train", str(path), "--fresh"], env=_env(home), capture_output=True, text=True
        )
        wall = time.time() - t0
        if proc.returncode != 0:
            return {"doc": doc.name, "variant": variant, "error": (proc.stderr or proc.stdout)[-800:]}
        show = json.loads(
            subprocess.run(
                [DLM, "show", str(path), "--json"], env=_env(home), check=True, capture_output=True, text=True
            ).stdout
        )
        folder = Path(next(v["path"] for v in show["versions"] if v["version"] == show["current"]))
        summary = json.loads((folder / "summary.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        learning = metrics.get("learning") or {}
        row = {
            "doc": doc.name,
            "variant": variant,
            "wall_s": round(wall, 1),
            "steps": summary["steps"],
            "train_s": round(summary["seconds"], 1),
            "learning": learning,
        }
        if doc.name == "prose.dlm":
            row["probes"] = _probe(path, home)
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _qa_count(doc: Path) -> str:
    text = doc.read_text()
    held = text.split("::instruction heldout::")
    return f"{held[0].count('### Q')} (+{held[1].count('### Q')} held out)" if len(held) > 1 else "prose"


def _cell(part: dict | None, key: str = "f1", base: str = "base_f1") -> str:
    if not part or part.get("n", 0) == 0 or part.get(key) is None:
        return "-"
    return f"{part[key]:.2f} ({part[base]:.2f})"


def line(r: dict) -> str:
    if "error" in r:
        return f"{r['doc']:14s} {r['variant']:6s} FAILED {r['error'][-300:]}"
    L = r["learning"]
    tr = L.get("train") or {}
    matched = f"{tr.get('learned', 0)}/{tr.get('n', 0)}" if tr.get("n") else "-"
    if "probes" in r:
        p = r["probes"]
        matched = f"{p['learned']}/{p['n']} probes"
    return (
        f"{r['doc']:14s} {r['variant']:6s} {r['steps']:4d} steps {r['wall_s']:6.0f} s  matched {matched:>12s}  "
        f"train F1 {_cell(tr)}  held-out F1 {_cell(L.get('heldout'))}"
    )


def markdown(rows: list[dict], info: dict) -> str:
    out = [
        "| document | Q/A pairs | variant | optimizer steps | `dlm train` wall time | training answers matched "
        "| training F1 (base) | held-out F1 (base) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['doc']} | | {r['variant']} | failed | | | | |")
            continue
        L = r["learning"]
        tr = L.get("train") or {}
        if "probes" in r:
            p = r["probes"]
            matched, f1 = f"{p['learned']}/{p['n']} probes", f"{p['f1']:.2f} ({p['base_f1']:.2f})"
        else:
            matched, f1 = (f"{tr['learned']}/{tr['n']}" if tr.get("n") else "-"), _cell(tr)
        out.append(
            f"| {r['doc']} | {_qa_count(HERE / r['doc'])} | {r['variant']} | {r['steps']} | "
            f"{r['wall_s'] / 60:.1f} min | {matched} | {f1} | {_cell(L.get('heldout'))} |"
        )
    out.append("")
    out.append(
        f"Measured by `{info['command']}` on {info['machine']}, {info['date']} ({info['minutes']:.0f} min in all)."
    )
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("docs", nargs="*", help="documents (default: every bench/learn/*.dlm)")
    ap.add_argument("--variants", default="dlm,peers")
    ap.add_argument("--md", default=None, help="write the table into this Markdown file (between the markers)")
    ap.add_argument("--json", default=str(REPO / "bench" / "out" / "learn.json"))
    args = ap.parse_args()
    docs = [Path(d) for d in args.docs] or sorted(
        HERE.glob("*.dlm"), key=lambda p: (p.stem != "prose", len(p.stem), p.stem)
    )
    t0, rows = time.time(), []
    for doc in docs:
        for variant in args.variants.split(","):
            r = run_one(doc, variant)
            print(line(r), flush=True)
            rows.append(r)
    import platform

    info = {
        "command": "make learn",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "date": time.strftime("%Y-%m-%d"),
        "minutes": (time.time() - t0) / 60,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    table = markdown(rows, info)
    if args.md:
        md = Path(args.md)
        text = md.read_text()
        start, end = "<!-- learn:begin -->", "<!-- learn:end -->"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        md.write_text(f"{head}{start}\n{table}{end}{tail}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
