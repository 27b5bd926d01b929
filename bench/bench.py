"""`make bench`: dlm vs a plain PEFT + TRL script on one document, in one run (see bench/harness.py).

    .venv/bin/python bench/bench.py [FILE] [--steps N] [--md docs/performance.md] [--png docs/performance.png]
    .venv/bin/python bench/bench.py --from-results bench/out/results.json   # re-render only

Prints one line per run as it ends, then the ratio table; writes the Markdown report, the PNG chart
and every run's raw figures (`bench/out/results.json`, worker logs beside it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `bench` is a folder of the repository, not of the installed package


def main() -> int:
    from bench import harness, report, results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", default=str(REPO / "configs" / "corpus-lora.dlm"))
    ap.add_argument("--steps", type=int, default=results.DEFAULT_STEPS, help="optimizer steps per run")
    ap.add_argument("--md", default=str(REPO / "docs" / "performance.md"))
    ap.add_argument("--png", default=str(REPO / "docs" / "performance.png"))
    ap.add_argument("--out", default=str(REPO / "bench" / "out"), help="worker logs and results.json")
    ap.add_argument("--from-results", metavar="JSON", help="re-render the report of a finished run; no training")
    args = ap.parse_args()
    if args.from_results:
        import json

        saved = json.loads(Path(args.from_results).read_text())
        done = report.report(saved["results"], saved["info"], Path(args.md), Path(args.png))
        print(report.ratio_table(done["summary"]))
        return 0
    home = Path(os.environ.get("DLM_HOME") or REPO / ".dlm-home")
    file = Path(args.file)
    shown = file.resolve().relative_to(REPO) if file.resolve().is_relative_to(REPO) else file
    done = harness.run(
        file,
        home,
        steps=args.steps,
        md=Path(args.md),
        png=Path(args.png),
        log_dir=Path(args.out),
        command=f"make bench ({shown}, --steps {args.steps})",
        on_line=lambda s: print(s, flush=True),
        label=str(shown),
    )
    print()
    print(report.ratio_table(done["summary"]))
    print(f"\nwrote {args.md}, {args.png} and {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
