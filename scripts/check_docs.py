"""Check the documentation: every relative link in README.md and docs/*.md resolves, the README stays short.

    python scripts/check_docs.py                         # dead links, README length; exit 1 on a problem
    python scripts/check_docs.py --old-readme OLD.md     # also: every ##/### heading of OLD.md is still a
                                                         # heading in README.md or docs/*.md (nothing lost)

A link target is a path relative to the file that holds it; `file.md#anchor` (or `#anchor`) must also
name a heading of that file, slugged as GitHub does. Links inside code (fenced blocks, `inline`) and
links with a scheme (https:, mailto:) are not checked.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_README_LINES = 220

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def headings(text: str) -> list[str]:
    """The text of every ATX heading outside code, in order."""
    return [m.group(2) for _, line in prose_lines(text) if (m := _HEADING.match(line))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor the file's headings define (a repeated slug gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link or image outside code."""
    return [(n, m.group(1)) for n, line in prose_lines(text)
            for m in _LINK.finditer(_INLINE_CODE.sub("", line))]


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def dead_links(root: Path) -> list[str]:
    """One message per link whose file or anchor does not exist."""
    problems = []
    for path in doc_files(root):
        if not path.is_file():
            problems.append(f"{path.relative_to(root)}: missing")
            continue
        text = path.read_text(encoding="utf-8")
        for n, target in links(text):
            if _SCHEME.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}:{n}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def readme_too_long(root: Path, max_lines: int = MAX_README_LINES) -> list[str]:
    readme = root / "README.md"
    n = len(readme.read_text(encoding="utf-8").splitlines()) if readme.is_file() else 0
    return [f"README.md: {n} lines, more than {max_lines}: move detail to docs/"] if n > max_lines else []


def lost_headings(old_readme: Path, root: Path) -> list[str]:
    """The ##/### headings of `old_readme` that are no heading (at any level) in README.md or docs/*.md."""
    old = [h for _, line in prose_lines(old_readme.read_text(encoding="utf-8"))
           if (m := _HEADING.match(line)) and len(m.group(1)) in (2, 3) and (h := m.group(2))]
    new = {h for p in doc_files(root) if p.is_file() for h in headings(p.read_text(encoding="utf-8"))}
    return [f"heading of {old_readme.name} not found in README.md or docs/: {h}" for h in old if h not in new]


def check(root: Path, old_readme: Path | None = None) -> list[str]:
    problems = dead_links(root) + readme_too_long(root)
    if old_readme is not None:
        problems += lost_headings(old_readme, root)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--old-readme", type=Path, help="a previous README whose headings must all survive")
    args = parser.parse_args(argv)
    problems = check(args.root.resolve(), args.old_readme)
    for p in problems:
        print(p)
    if not problems:
        print(f"docs ok: {len(doc_files(args.root))} files, links resolve, README within {MAX_README_LINES} lines")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
