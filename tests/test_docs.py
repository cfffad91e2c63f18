"""The repository cites only itself: no reference to the internal brief outside it, and every section of
docs/methods.md that code, docs or tests cite exists as a heading there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS_DOC = ROOT / "docs" / "methods.md"
_SKIP_DIRS = {".git", ".venv", ".cache", "__pycache__", ".pytest_cache", "node_modules"}
_TEXT = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".sh", ".json", ".rst", ""}

_BRIEF = "METHODS"
FORBIDDEN = re.compile(
    re.escape(_BRIEF + ".md")
    + r"|\.\./shared\b|/work/shared\b"
    + r"|\b" + _BRIEF + r"(?:'|\s+(?:sections?\s+)?\d)"  # "<brief> 3.3", "<brief> section 0", "<brief>' layer"
)
_NUM = r"\d+(?:\.\d+)*"
_LIST = rf"{_NUM}(?:(?:\s*,\s*(?:and\s+)?|\s+and\s+|\s*/\s*){_NUM})*"
# "docs/methods.md section 1.3", "[docs/methods.md](docs/methods.md) sections 0 and 1", "methods.md sections 3.3, 3.4"
CITATION = re.compile(rf"methods\.md\]?(?:\([^)\s]*\))?,?\s+sections?\s+({_LIST})")
# a number straight after the file name, without the word "section": an ambiguous citation
BARE = re.compile(rf"methods\.md\]?(?:\([^)\s]*\))?,?\s+§?\d")
HEADING = re.compile(rf"^#{{2,4}}\s+({_NUM})\.?\s", re.MULTILINE)
INTERNAL = re.compile(rf"\bsections?\s+({_LIST})")


def _files() -> list[Path]:
    """Tracked files plus new files that git does not ignore (other work in progress); a walk without git."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        paths = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if not _SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]
    me = Path(__file__).resolve()  # this file spells out the patterns it looks for
    return [p for p in paths if p.is_file() and p.suffix in _TEXT and p.stat().st_size < 2_000_000 and p.resolve() != me]


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def _numbers(listing: str) -> list[str]:
    return re.findall(_NUM, listing)


def _headings() -> set[str]:
    return set(HEADING.findall(_read(METHODS_DOC)))


def test_methods_doc_sections():
    found = HEADING.findall(_read(METHODS_DOC))
    assert len(found) == len(set(found)), f"duplicate section numbers in docs/methods.md: {found}"
    # the top-level sections every reference relies on: 0 strategy, 1 PatchNorm, 2 ANAct, 3 UAN, 4 geometry
    assert {"0", "1", "2", "3", "4", "0.1", "0.2", "1.3", "2.2", "2.4", "3.3", "3.4"} <= set(found)


def test_nothing_refers_outside_the_repository():
    hits = []
    for p in _files():
        for n, line in enumerate(_read(p).splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "references to the internal brief (cite docs/methods.md instead):\n" + "\n".join(hits)


def test_every_cited_section_exists():
    headings = _headings()
    missing, bare, cited = [], [], 0
    for p in _files():
        text = _read(p)
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            for num in _numbers(m.group(1)):
                cited += 1
                if num not in headings:
                    missing.append(f"{p.relative_to(ROOT)}:{line}: section {num}")
        for m in BARE.finditer(text):
            bare.append(f"{p.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}")
    assert cited > 40  # the code and docs cite the document throughout; 0 would mean the pattern broke
    assert not missing, "cited sections missing from docs/methods.md:\n" + "\n".join(missing)
    assert not bare, "write 'docs/methods.md section N', not a bare number:\n" + "\n".join(bare)


def test_methods_doc_internal_references_exist():
    headings = _headings()
    text = _read(METHODS_DOC)
    missing = [n for m in INTERNAL.finditer(text) for n in _numbers(m.group(1)) if n not in headings]
    assert not missing, f"docs/methods.md refers to sections it does not have: {missing}"


def test_readme_links_the_methods_doc():
    assert "](docs/methods.md)" in _read(ROOT / "README.md")


@pytest.mark.parametrize("text, ok", [
    ("see docs/methods.md section 1.3.3", True),
    ("see docs/methods.md section 9.9", False),
    ("[docs/methods.md](docs/methods.md) sections 0 and 2", True),
    ("methods.md sections 3.3, 3.4 and 7", False),
])
def test_citation_pattern(text, ok):
    """The checker itself: a wrong number is caught, in every citation form the repository uses."""
    nums = [n for m in CITATION.finditer(text) for n in _numbers(m.group(1))]
    assert nums and all(n in _headings() for n in nums) is ok


@pytest.mark.parametrize("text", [_BRIEF + ".md section 0", _BRIEF + " 3.3", _BRIEF + "' layer", "../" + "shared/x"],
                         ids=["file", "number", "possessive", "outside"])
def test_forbidden_pattern(text):
    assert FORBIDDEN.search(text)


@pytest.mark.parametrize("text", ["ACTIVATION_" + _BRIEF + " = {", "if method not in " + _BRIEF + ":"],
                         ids=["constant", "use"])
def test_code_names_are_not_references(text):
    assert not FORBIDDEN.search(text)
