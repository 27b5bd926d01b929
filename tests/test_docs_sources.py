"""The docs cite only what a reader of the repository can follow: no path that leads outside it, every
relative link lands on a file in it, every source id `[Sn]` is defined in docs/sources.md, and every
issue cited as `NAME #N` is listed there with its address (docs/sources.md says why)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

DOCS = REPO / "docs"
SOURCES = DOCS / "sources.md"
PAGES = sorted([*DOCS.glob("*.md"), REPO / "README.md"])

# Text that points at files a reader does not have: the material beside the checkout the project
# started from, and machine-specific absolute paths. `/home/me/` is the docs' example user.
OUTSIDE = [
    (re.compile(r"\.\./shared/"), "a path beside the repository"),
    (re.compile(r"shared/reference"), "the reference folder beside the repository"),
    (re.compile(r"\bfacts\.md\b"), "a notes file beside the repository"),
    (re.compile(r"\bSTACK\.md\b"), "a notes file beside the repository"),
    (re.compile(r"/work/"), "a machine-specific absolute path"),
    (re.compile(r"/home/(?!me/)"), "a machine-specific absolute path"),
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SOURCE_ID = re.compile(r"\[S(\d+)\]")
DEFINED_ID = re.compile(r'<a id="s(\d+)"></a>\*\*\[S(\d+)\]')
ISSUE = re.compile(r"\b([A-Za-z][\w.-]*)\s+(PR\s+)?#(\d+)((?:\s*,\s*#\d+)*)")


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def outside_paths(pages: list[Path]) -> list[str]:
    """`file:line: what` for every mention of a path outside the repository."""
    found = []
    for page in pages:
        for n, line in enumerate(_text(page).splitlines(), 1):
            for pattern, what in OUTSIDE:
                if pattern.search(line):
                    found.append(f"{page.name}:{n}: {what}: {line.strip()[:100]}")
    return found


def broken_links(pages: list[Path], repo: Path) -> list[str]:
    """`file: target` for every relative link that does not land on a file inside the repository."""
    broken = []
    for page in pages:
        for target in LINK.findall(_text(page)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, a mailto:, or an anchor in the same page
            path = target.split("#", 1)[0]
            resolved = (page.parent / path).resolve()
            if not resolved.is_relative_to(repo.resolve()) or not resolved.exists():
                broken.append(f"{page.name}: {target}")
    return broken


def defined_ids(sources: Path) -> set[str]:
    """The ids docs/sources.md defines: an anchor and the bold id, which must agree."""
    ids = set()
    for anchor, bold in DEFINED_ID.findall(_text(sources)):
        assert anchor == bold, f"anchor s{anchor} labels [S{bold}]"
        ids.add(bold)
    return ids


def cited_issues(pages: list[Path]) -> set[tuple[str, str]]:
    """(repository name, number) for every `NAME #N`, `NAME PR #N` and `NAME #N, #M` in the pages."""
    cited = set()
    for page in pages:
        for name, _pr, number, more in ISSUE.findall(_text(page)):
            for n in [number, *re.findall(r"#(\d+)", more)]:
                cited.add((name, n))
    return cited


def test_the_pages_are_there() -> None:
    """A glob that finds nothing would make the tests below pass vacuously."""
    names = {p.name for p in PAGES}
    assert {"README.md", "sources.md", "doctor.md", "compare.md", "estimates.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_points_outside_the_repository(page: Path) -> None:
    assert outside_paths([page]) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_lands_on_a_file_of_the_repository(page: Path) -> None:
    assert broken_links([page], REPO) == []


def test_every_source_id_used_is_defined_in_sources_md() -> None:
    defined = defined_ids(SOURCES)
    assert defined, "docs/sources.md defines no [Sn]"
    assert sorted(defined, key=int) == [str(i) for i in range(1, len(defined) + 1)], "ids run S1..Sn"
    used = {(page.name, n) for page in PAGES for n in SOURCE_ID.findall(_text(page))}
    assert sorted((name, f"S{n}") for name, n in used if n not in defined) == []
    for page in PAGES:
        for n in re.findall(r"sources\.md#s(\d+)", _text(page)):
            assert n in defined, f"{page.name} links sources.md#s{n}, which is not defined"


def test_every_cited_issue_is_listed_in_sources_md() -> None:
    listed = _text(SOURCES).lower()
    cited = cited_issues(PAGES)
    assert ("peft", "1731") in cited  # the pattern finds what the docs cite
    missing = sorted(
        f"{name} #{n}"
        for name, n in cited
        if f"{name.lower()} #{n}" not in listed and f"{name.lower()} pr #{n}" not in listed
    )
    assert missing == []


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """The helpers flag the kinds of citation this file exists to keep out."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "sources.md").write_text('<a id="s1"></a>**[S1] A paper.** peft #1\n')
    page = docs / "page.md"
    page.write_text(
        # the machine path is spelt in two pieces so that this file holds none itself
        "from `../shared/reference/facts.md`, see /wor"
        "k/x and /home/alice/y;\n"
        "[gone](missing.md), [out](../../etc/hosts), [ok](sources.md#s1), [web](https://example.org)\n"
        "cited: [S1](sources.md#s1), trl #9 and GaLore #2, #23\n"
    )
    found = outside_paths([page])  # ../shared/, shared/reference, facts.md, /work/, /home/alice/
    assert len(found) == 5 and all(f.startswith("page.md:1: ") for f in found)
    assert broken_links([page], tmp_path) == ["page.md: missing.md", "page.md: ../../etc/hosts"]
    assert defined_ids(docs / "sources.md") == {"1"}
    assert cited_issues([page]) == {("trl", "9"), ("GaLore", "2"), ("GaLore", "23")}
