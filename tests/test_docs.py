"""The documentation's relative links: every tracked Markdown file's links reach a file that
exists, and every `#anchor` names a heading of the Markdown file it points into.

External links (http, https, mailto, ...) are not checked: no network here, and they are
not this project's to keep.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest
from helpers import REPO

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files() -> list[Path]:
    """Every Markdown file git tracks, plus new ones not yet added (what a commit would hold)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sorted(REPO / name for name in listed if (REPO / name).is_file())


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)[0] * len(opening.group(1))
        elif fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
        else:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped,
    lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition (none
    inside code)."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            targets.append(definition.group(1))
        found += [(number, target.strip("<>")) for target in targets]
    return found


def broken_links(path: Path) -> list[str]:
    """What is wrong with each relative link of one Markdown file, one line each."""
    problems = []
    for number, target in links(path):
        if SCHEME.match(target):
            continue
        where = f"{path.relative_to(REPO)}:{number}: ({target})"
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if not file_part:
            resolved = path
        elif file_part.startswith("/"):
            resolved = REPO / file_part.lstrip("/")
        else:
            resolved = (path.parent / file_part).resolve()
        if not resolved.exists():
            problems.append(f"{where} no such file or directory")
        elif REPO.resolve() not in (resolved.resolve(), *resolved.resolve().parents):
            problems.append(f"{where} points outside the repository")
        elif anchor and resolved.suffix == ".md" and unquote(anchor).lower() not in anchors(resolved):
            problems.append(f"{where} no heading with that anchor in {resolved.relative_to(REPO.resolve())}")
        elif anchor and resolved.is_dir():
            problems.append(f"{where} an anchor into a directory")
    return problems


def test_the_front_page_and_the_topic_pages_exist():
    names = {str(p.relative_to(REPO)) for p in markdown_files()}
    assert {"README.md", "docker/README.md", "k8s/README.md", "slurm/README.md", "tests/README.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_the_checker_sees_what_is_broken(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Exit codes (`75`)\n\n## Exit codes (`75`)\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n## Quick start\n\n"
        "[ok](docs/other.md) [ok](docs/other.md#exit-codes-75) [ok](docs/other.md#exit-codes-75-1)\n"
        "[ok](#quick-start) ![ok](docs/other.md) [ok](https://example.com/missing) [ok](docs/)\n"
        "`[not a link](missing.md)`\n```\n[not a link](missing.md)\n```\n"
        "[bad](docs/missing.md)\n[bad](docs/other.md#nowhere)\n[bad](#no-such-section)\n"
        "![bad](figures/missing.png)\n[bad]: ../outside.md\n"
    )
    problems = broken_links(page)
    assert [p.split(": (")[1].split(")")[0] for p in problems] == [
        "docs/missing.md",
        "docs/other.md#nowhere",
        "#no-such-section",
        "figures/missing.png",
        "../outside.md",
    ], problems


def run_directory_problems(names: set[str], markdown: str) -> list[str]:
    """Where docs/RUN-DIRECTORY.md's table and the run directory's entry `names` differ."""
    first_cells = [line.split("|")[1] for line in markdown.splitlines() if line.startswith("| `")]
    rows = {cell.strip().strip("`").split("/")[0] for cell in first_cells}
    return [f"{name}: written by the job, no row in docs/RUN-DIRECTORY.md" for name in sorted(names - rows)] + [
        f"{name}: a row in docs/RUN-DIRECTORY.md, not written by the job" for name in sorted(rows - names)
    ]


def test_the_run_directory_reference_has_a_row_for_every_entry_the_job_writes():
    from job.hang import HANG_DIR
    from job.run_dir import RunDir

    run = RunDir(Path("run"))
    names = {path.relative_to(run.path).parts[0] for path in run.written()} | {HANG_DIR}
    problems = run_directory_problems(names, (REPO / "docs" / "RUN-DIRECTORY.md").read_text())
    assert not problems, "\n".join(problems)
    assert run_directory_problems(names | {"events.db"}, (REPO / "docs" / "RUN-DIRECTORY.md").read_text()) == [
        "events.db: written by the job, no row in docs/RUN-DIRECTORY.md"
    ], "the check sees a new entry without its row"
