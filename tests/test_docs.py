"""The docs hold together: README.md stays a five-minute read, links every page in docs/, and no relative link in
README.md, CONTRIBUTING.md or docs/ points at a file or a heading that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 12 * 1024
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINKING = [README, ROOT / "CONTRIBUTING.md", *PAGES]

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without code blocks and inline code, where brackets are code, not links."""
    return _CODE.sub("", _FENCE.sub("", text))


def relative_links(path: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(path.read_text())) if not re.match(r"[a-z]+:", t)]


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return {
        re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        for heading in _HEADING.findall(_FENCE.sub("", path.read_text()))
    }


def test_readme_is_at_most_12_kib() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail to docs/"


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README)}
    missing = [p.name for p in PAGES if p.resolve() not in linked]
    assert PAGES and not missing, f"docs pages README.md does not link: {missing}"


@pytest.mark.parametrize("page", LINKING, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files_and_headings(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_link_and_anchor_rules_on_known_text(tmp_path: Path) -> None:
    # The checks above pass vacuously if the patterns find nothing: hold them to a page with known links.
    page = tmp_path / "p.md"
    page.write_text(
        "# CPU: the real `SmolLM2`, 10,000 rows\n[a](x.md) [b](https://e.org) `[c](code.md)`\n"
        "```\n[d](fenced.md)\n```\n[e](#cpu-the-real-smollm2-10000-rows)\n"
    )
    assert relative_links(page) == ["x.md", "#cpu-the-real-smollm2-10000-rows"]
    assert anchors(page) == {"cpu-the-real-smollm2-10000-rows"}


def test_every_error_kind_is_documented() -> None:
    # The output's error_kind column and the bad-input catalogue name every kind a row can fail with.
    from kvbatch.errors import ErrorKind

    outputs, catalogue = (ROOT / "docs" / "outputs.md").read_text(), (ROOT / "docs" / "bad-input.md").read_text()
    column = next(line for line in outputs.splitlines() if line.startswith("| `error_kind` |"))
    assert [k.value for k in ErrorKind if f"`{k.value}`" not in column] == []
    assert [k.value for k in ErrorKind if f"| `{k.value}` |" not in catalogue] == []
