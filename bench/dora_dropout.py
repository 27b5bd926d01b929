"""Step time of LoRA vs DoRA (PEFT's input dropout vs dlm's branch dropout) on random Llamas.

    .venv/bin/python bench/dora_dropout.py [--shape tiny|medium|both] [--steps 6] [--warmup 2]
                                           [--checkpointing] [--verbose]

A step is forward + backward + AdamW on a fixed random batch (4 x 64 tokens, fp32, r=8, alpha=16,
q/k/v/o). The variants are built up front and stepped in rotating order, one step each per round,
so a noisy neighbour on a shared CPU hits them all alike; the first `--warmup` rounds are dropped
and the median of the rest is reported. `medium` is SmolLM2-135M's shape with random weights.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    "medium": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}
# name -> (use_dora, lora_dropout, branch mode)
VARIANTS = {
    "LoRA d=0.05": (False, 0.05, False),
    "DoRA d=0.05 (PEFT)": (True, 0.05, False),
    "DoRA d=0.05 (branch)": (True, 0.05, True),
    "DoRA d=0": (True, 0.0, False),
    "LoRA d=0": (False, 0.0, False),  # for context: what the dropout op itself costs
}


def bench(
    shape: str, steps: int, warmup: int, checkpointing: bool, verbose: bool = False
) -> dict[str, tuple[float, float]]:
    """name -> (median, min) seconds per step over the measured rounds."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlm.train.dora_fast import enable_branch_dropout

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (4, 64))
    runs = {}
    for name, (use_dora, dropout, branch) in VARIANTS.items():
        cfg = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=dropout,
            use_dora=use_dora,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
        model = get_peft_model(copy.deepcopy(base), cfg)
        if branch:
            assert enable_branch_dropout(model) == 4 * SHAPES[shape]["num_hidden_layers"]
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (model, opt, [])
    del base

    names = list(runs)
    for round_ in range(warmup + steps):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # rotate the order
            model, opt, times = runs[name]
            t = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
    if verbose:
        for name, (_, _, times) in runs.items():
            print(f"  {name}: " + " ".join(f"{x:.3f}" for x in times))
    return {name: (statistics.median(times[warmup:]), min(times[warmup:])) for name, (_, _, times) in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["tiny", "medium", "both"], default="both")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on (TRL's default)")
    ap.add_argument("--verbose", action="store_true", help="print every step's time")
    args = ap.parse_args()
    import torch

    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, checkpointing {'on' if args.checkpointing else 'off'}"
    )
    for shape in ["tiny", "medium"] if args.shape == "both" else [args.shape]:
        t0 = time.perf_counter()
        med = bench(shape, args.steps, args.warmup, args.checkpointing, args.verbose)
        lora, lora_min = med["LoRA d=0.05"]
        print(
            f"\n{shape}: median s/step over {args.steps} (after {args.warmup} warm-up), "
            f"{time.perf_counter() - t0:.0f} s in all"
        )
        print("| variant | median s/step | vs LoRA d=0.05 | min s/step | min vs LoRA |\n|---|---|---|---|---|")
        for name, (m, lo) in med.items():
            print(f"| {name} | {m:.4f} | x{m / lora:.2f} | {lo:.4f} | x{lo / lora_min:.2f} |")


if __name__ == "__main__":
    main()
