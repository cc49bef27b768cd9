"""The documentation check (scripts/check_docs.py): this checkout's docs, and the checker on small trees."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_docs", ROOT / "scripts" / "check_docs.py")
check_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_docs)


def make_tree(tmp_path: Path, readme: str, docs: dict[str, str] | None = None) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(readme)
    for name, text in (docs or {}).items():
        (tmp_path / "docs" / name).write_text(text)
    return tmp_path


def test_this_checkout_has_no_dead_links_and_a_short_readme():
    assert check_docs.check(ROOT) == []
    assert check_docs.main(["--root", str(ROOT)]) == 0


def test_every_docs_file_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    targets = {t.partition("#")[0] for _, t in check_docs.links(readme)}
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in targets, doc.name


def test_a_dead_relative_link_is_reported(tmp_path):
    root = make_tree(tmp_path, "# r\n\n[ok](docs/a.md) and ![img](docs/missing.png)\n",
                     {"a.md": "# A\n\n[back](../README.md) [gone](b.md)\n"})
    problems = check_docs.dead_links(root)
    assert len(problems) == 2
    assert problems[0].startswith("README.md:3: docs/missing.png: no such file")
    assert problems[1].startswith("docs/a.md:3: b.md: no such file")
    assert check_docs.main(["--root", str(root)]) == 1


def test_an_anchor_must_name_a_heading_of_the_target(tmp_path):
    doc = "# Models and engines\n\n## engine=vllm\n\n## Forgetting check: `rrr benchmark` (lm-eval)\n"
    root = make_tree(tmp_path, "[a](docs/m.md#enginevllm) [b](docs/m.md#forgetting-check-rrr-benchmark-lm-eval)\n",
                     {"m.md": doc})
    assert check_docs.dead_links(root) == []
    (root / "README.md").write_text("[a](docs/m.md#engine-vllm) [self](#nowhere)\n# Here\n[c](#here)\n")
    problems = check_docs.dead_links(root)
    assert [p.split(": ")[1] for p in problems] == ["docs/m.md#engine-vllm", "#nowhere"]


def test_repeated_headings_get_numbered_anchors():
    assert check_docs.anchors("## Runs\n## Runs\n## Runs\n") == {"runs", "runs-1", "runs-2"}


def test_links_in_code_and_with_a_scheme_are_not_checked(tmp_path):
    readme = ("```\n[x](nowhere.md)\n```\n`[y](nowhere.md)` [web](https://example.org/x.md) "
              "[mail](mailto:a@b.c)\n")
    root = make_tree(tmp_path, readme)
    assert check_docs.dead_links(root) == []


def test_readme_longer_than_the_limit_is_reported(tmp_path):
    root = make_tree(tmp_path, "line\n" * check_docs.MAX_README_LINES)
    assert check_docs.readme_too_long(root) == []
    (root / "README.md").write_text("line\n" * (check_docs.MAX_README_LINES + 1))
    assert check_docs.readme_too_long(root) == ["README.md: 221 lines, more than 220: move detail to docs/"]
    assert check_docs.main(["--root", str(root)]) == 1


def test_a_heading_of_the_old_readme_that_went_nowhere_is_reported(tmp_path):
    old = tmp_path / "OLD.md"
    old.write_text("# rrr\n## Kept\n### Moved\n## Lost\n### Lost too\n```\n## in code\n```\n#### Too deep\n")
    (tmp_path / "new").mkdir()
    root = make_tree(tmp_path / "new", "# rrr\n## Kept\n", {"x.md": "# Moved\n"})
    assert check_docs.lost_headings(old, root) == [f"heading of OLD.md not found in README.md or docs/: {h}"
                                                 for h in ("Lost", "Lost too")]
    assert check_docs.main(["--root", str(root), "--old-readme", str(old)]) == 1
