"""Run `dlm` as if some packages were not installed: `python tests/hidden_packages.py DIST[,DIST] -- ARGS...`.

Every finder on `sys.meta_path` is wrapped so that the packages' top-level modules are not found
(`importlib.util.find_spec` returns None, `import` raises ModuleNotFoundError) and their
distributions are not listed by `importlib.metadata`. Nothing is patched inside dlm: the command
runs exactly as it would in a venv without those packages.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Iterator
from typing import Any

# distribution -> the top-level module it installs
MODULES = {"tensorboard": "tensorboard", "galore-torch": "galore_torch"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


class _Hiding:
    """One finder of `sys.meta_path`, minus the hidden packages."""

    def __init__(self, inner: Any, modules: set[str], dists: set[str]):
        self.inner, self.modules, self.dists = inner, modules, dists

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name.partition(".")[0] in self.modules:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None

    def find_distributions(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        find = getattr(self.inner, "find_distributions", None)
        for dist in find(*args, **kwargs) if find else ():
            if _norm(dist.metadata["Name"] or "") not in self.dists:
                yield dist

    def invalidate_caches(self) -> None:
        invalidate = getattr(self.inner, "invalidate_caches", None)
        if invalidate:
            invalidate()


def hide(dists: list[str]) -> None:
    names = {_norm(d) for d in dists}
    modules = {MODULES.get(d, d.replace("-", "_")) for d in names}
    for module in list(sys.modules):
        if module.partition(".")[0] in modules:
            raise SystemExit(f"{module} was imported before it could be hidden")
    sys.meta_path[:] = [_Hiding(finder, modules, names) for finder in sys.meta_path]


if __name__ == "__main__":
    hidden, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: hidden_packages.py DIST[,DIST] -- dlm arguments"
    hide(hidden.split(","))
    sys.argv = ["dlm", *args]
    runpy.run_module("dlm", run_name="__main__", alter_sys=True)
