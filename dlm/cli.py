"""The `dlm` command line: option declarations, one call each, then render.

Every `DlmError` is caught once, in `main`: `path:line:col: message` and `hint:` on stderr, exit 2
for bad input and 1 for a failed or blocked run. Anything else is a bug and keeps its traceback.
Heavy libraries are imported only inside the commands that train, so `dlm --help`, `dlm schema`
and `dlm doctor FILE` stay instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from dlm import __version__, render
from dlm.errors import DlmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn one authored document into a fine-tuned adapter, with every knob explained.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)


class State:
    home: Path = Path(os.environ.get("DLM_HOME") or Path.home() / ".dlm")
    verbosity: int = 0


def _version(value: bool) -> None:
    if value:
        out.print(f"dlm {__version__}")
        raise typer.Exit(0)


@app.callback()
def _global(
    home: Annotated[Optional[Path], typer.Option("--home", help="Store and bases folder (default $DLM_HOME or ~/.dlm).")] = None,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More detail.")] = 0,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors and results.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    if home is not None:
        State.home = home.expanduser().resolve()
    State.verbosity = -1 if quiet else verbose


def _hardware(fixture: Optional[Path]):
    from dlm import hardware

    if fixture is None:
        return hardware.probe_light()
    try:
        return hardware.load_fixture(fixture)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DlmError(f"cannot read hardware file: {exc}", "pass a file written by `dlm doctor --json` (its hardware object)", str(fixture)) from None


@app.command()
def doctor(
    files: Annotated[Optional[list[Path]], typer.Argument(help="Documents (.dlm) or specs (.yaml) to plan.", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Stable JSON (docs/cli.md) instead of tables.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 on any warning, not only on a block.")] = False,
    hardware_file: Annotated[Optional[Path], typer.Option("--hardware", help="Plan for another machine: a HardwareFacts JSON file.")] = None,
) -> None:
    """Report the environment, or audit each document's plan before any weights load."""
    from dlm.doctor import diagnose, environment_report

    hw = _hardware(hardware_file)
    if not files:
        report = environment_report(hw, State.home)
        render.as_json(out, report) if json_out else render.environment(out, report)
        return
    results = [diagnose(f, hw) for f in files]
    if json_out:
        render.as_json(out, {"dlm": __version__, "hardware": hw.to_json(), "files": [r.to_json() for r in results]})
    else:
        for r in results:
            render.plan(out, r.path, r.plan, r.base, hw, r.corpus)
    blocked = any(r.plan.blocked for r in results)
    warned = any(f.level == "warn" for r in results for f in r.plan.findings)
    raise typer.Exit(1 if blocked or (strict and warned) else 0)


@app.command()
def init(
    file: Annotated[Path, typer.Argument(help="The new document to write.")],
    base: Annotated[str, typer.Option("--base", help="base_model: alias, hub id, folder or .gguf.")] = "smollm2-135m",
    adapter: Annotated[str, typer.Option("--adapter", help="lora | qlora | dora")] = "lora",
) -> None:
    """Write a commented scaffold with a fresh dlm_id. Never overwrites."""
    from dlm.authoring import scaffold
    from dlm.fsutil import write_new
    from dlm.schema import new_id

    if adapter not in ("lora", "qlora", "dora"):
        raise DlmError(f"--adapter must be lora, qlora or dora (got {adapter!r})", "for example: --adapter dora")
    write_new(file, scaffold(new_id(), base, adapter, file.stem.replace("-", " ").title()))
    out.print(f"wrote {file}; next: dlm doctor {file}")


@app.command()
def twin(
    file: Annotated[Path, typer.Argument(help="The document to copy.")],
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE override, e.g. training.adapter=dora (repeatable).")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write the copy (default: NAME-VALUE.dlm).")] = None,
) -> None:
    """Copy a document with a fresh dlm_id and the given overrides, validated before it is written."""
    from dlm.doctor import make_twin

    target = make_twin(file, sets or [], output)
    out.print(f"wrote {target} (its own dlm_id); compare them with: dlm compare {file} {target}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the frontmatter (for editor completion)."""
    from dlm.schema import json_schema

    render.as_json(out, json_schema())


# typer >= 0.29 vendors click; find its exception base through a public class either way.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except DlmError as exc:
        render.error(err, exc)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except _ClickException as exc:
        exc.show()
        sys.exit(2 if exc.exit_code not in (0, 1) else exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
