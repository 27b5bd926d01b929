"""`make twin`'s check of a `dlm compare --json` report: its documented shape and the sanity of its
numbers. It never asserts which side wins; that is the report's job, not the check's.

    python bench/twin_check.py REPORT.json [PLOT.png]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_compare import check_shape


def check_numbers(data: dict) -> None:
    sides = data["sides"]
    for role in ("base", "A", "B"):
        s = sides[role]
        assert 0 < s["eval_loss"] < 20, (role, s["eval_loss"])
        assert math.isclose(s["perplexity"], math.exp(s["eval_loss"]), rel_tol=1e-6), role
    assert sides["base"]["delta_kl"] == 0.0
    for role in ("A", "B"):
        s = sides[role]
        assert s["delta_kl"] >= 0, role
        assert s["steady_step_seconds"] > 0 and s["train_seconds"] >= s["steady_step_seconds"], role
        assert s["steps"] > 0 and s["peak_memory_bytes"] > 2**20 and s["trainable_params"] > 0, role
        assert s["adapter_bytes"] > 0, role
    assert sides["A"]["adapter"] == "lora" and sides["B"]["adapter"] == "dora"
    # DoRA adds one magnitude per output feature of each adapted layer: strictly more parameters.
    assert sides["B"]["trainable_params"] > sides["A"]["trainable_params"]
    keys = {d["key"] for d in data["config_diff"] if d["source"] == "spec"}
    assert keys == {"training.adapter"}, f"the twins should differ only in training.adapter, not {keys}"
    v = data["verdict"]
    assert v["keep"] == ("B" if v["b_pays"] else "A")
    assert v["outcome"] in ("B pays", "keep A", "inconclusive") and v["b_pays"] is (v["outcome"] == "B pays")
    # every outcome is acceptable here; what must hold is that it has an interval from every example
    assert v["gain_low"] is not None and v["gain_low"] <= v["gain_high"], v
    assert v["examples"] == data["heldout"]["examples"] and v["resamples"] >= 1000 and 0 < v["level"] < 1
    assert v["outcome"] in v["reason"] and f"{v['gain_low']:+.2%}" in v["reason"]
    assert v["step_time_ratio"] > 0 and v["memory_ratio"] > 0
    assert data["data"]["same"] is True


def main(argv: list[str]) -> int:
    data = json.loads(Path(argv[1]).read_text())
    check_shape(data)
    check_numbers(data)
    if len(argv) > 2:
        png = Path(argv[2]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, "the plot is not a real PNG"
    v = data["verdict"]
    print(
        f"twin report ok: {v['outcome']} (gain {v['gain']:+.4f}, {v['level']:.0%} interval {v['gain_low']:+.4f} to "
        f"{v['gain_high']:+.4f} over {v['examples']} examples; step time x{v['step_time_ratio']:.2f}, "
        f"memory x{v['memory_ratio']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
