"""The documentation runs: every fenced block marked runnable in README.md and docs/*.md is
executed, and every relative link points at a file (and heading) that exists.

Convention: a fenced block whose info string is ``bash runnable`` or ``python runnable`` is run.
A bash block runs with ``bash -e -o pipefail -c`` in a fresh temporary folder, with the repo's
``.venv/bin`` first on PATH and PYTHONPATH at the repo root; a python block runs as a script with
the venv's python, in the same way. Only blocks that take a few seconds on 2 CPUs are marked;
set-up and blocks that start Ray stay plain. Nothing here reads the prose.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = ROOT / ".venv" / "bin"
BIN = VENV_BIN if (VENV_BIN / "python").exists() else Path(sys.executable).parent
LANGUAGES = ("bash", "python")
TIMEOUT_S = 300

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
HEADING = re.compile(r"^#{1,6}\s+(?P<text>.+?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(?P<target>\S+)", re.M)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # the opening fence's line, 1-based
    info: str
    code: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def runnable(self) -> bool:
        return "runnable" in self.info.split()[1:]

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} ({self.info})"


def fenced_blocks(text: str, path: Path) -> tuple[list[Block], str]:
    """The fenced blocks of a Markdown text, and the text outside them."""
    blocks: list[Block] = []
    outside: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening or (opening["fence"][0] == "`" and "`" in opening["info"]):
            outside.append(lines[i])
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[j]
            if indent:  # a block indented in a list item: its lines lose that indent
                line = line[indent:] if line[:indent].isspace() else line.lstrip()
            body.append(line)
            j += 1
        blocks.append(Block(path, i + 1, opening["info"].strip(), "\n".join(body) + "\n"))
        outside.append("")
        i = j + 1
    return blocks, "\n".join(outside)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, outside = fenced_blocks(path.read_text(), path)
    found: set[str] = set()
    for line in outside.splitlines():
        heading = HEADING.match(line)
        if heading:
            base = slug(heading["text"])
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def broken_links(text: str, path: Path) -> list[str]:
    """The relative links of a Markdown text (outside code) that point at nothing."""
    _, outside = fenced_blocks(text, path)
    outside = CODE_SPAN.sub("", outside)
    targets = [m["target"] for m in LINK.finditer(outside)]
    targets += [m["target"] for m in REFERENCE.finditer(outside)]
    broken = []
    for target in targets:
        target = target.strip("<>")
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = (path.parent / file_part).resolve() if file_part else path
        if not where.exists():
            broken.append(f"{target} (no such file: {where})")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target} (no heading #{anchor} in {where.name})")
    return broken


def run_block(block: Block, folder: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("VIRTUAL_ENV", None)
    if block.language == "bash":
        command = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    elif block.language == "python":
        script = folder / "block.py"
        script.write_text(block.code)
        command = [str(BIN / "python"), str(script)]
    else:
        raise ValueError(f"{block}: runnable blocks are bash or python, not {block.language!r}")
    return subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _all_blocks() -> list[Block]:
    return [b for path in DOCS for b in fenced_blocks(path.read_text(), path)[0]]


RUNNABLE = [b for b in _all_blocks() if b.runnable]


def test_the_docs_mark_some_blocks_runnable_in_a_known_language():
    assert RUNNABLE, "no fenced block is marked runnable in README.md or docs/*.md"
    unknown = [str(b) for b in RUNNABLE if b.language not in LANGUAGES]
    assert unknown == [], f"runnable blocks must be one of {LANGUAGES}"


@pytest.mark.slow  # each block starts bilevel-ray, and torch with it: seconds each
@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_a_runnable_block_runs(block, tmp_path):
    done = run_block(block, tmp_path)
    assert done.returncode == 0, (
        f"{block} exited {done.returncode}\n--- code\n{block.code}"
        f"--- stdout (end)\n{done.stdout[-3000:]}\n--- stderr (end)\n{done.stderr[-3000:]}"
    )


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_something_that_exists(path):
    assert broken_links(path.read_text(), path) == []


# The checks themselves: a failing block and a broken link are caught.


def test_a_failing_block_is_detected(tmp_path):
    text = (
        "Intro.\n\n```bash runnable\ntrue\nfalse\necho never\n```\n\n"
        "```python runnable\nraise SystemExit(4)\n```\n\n"
        "````markdown\n```bash runnable\nfalse\n```\n````\n\n"
        "```bash\nfalse   # a plain block: shown, never run\n```\n"
    )
    blocks, _ = fenced_blocks(text, tmp_path / "x.md")
    assert [(b.info, b.runnable) for b in blocks] == [
        ("bash runnable", True),
        ("python runnable", True),
        ("markdown", False),
        ("bash", False),
    ]
    failing_bash, failing_python = blocks[0], blocks[1]
    done = run_block(failing_bash, tmp_path)
    assert done.returncode != 0 and "never" not in done.stdout  # stops at the first failure
    assert run_block(failing_python, tmp_path).returncode == 4
    passing = Block(tmp_path / "x.md", 1, "bash runnable", "bilevel-ray --help > /dev/null\n")
    assert run_block(passing, tmp_path).returncode == 0  # the venv's command is on PATH


def test_a_broken_link_is_detected(tmp_path):
    (tmp_path / "there.md").write_text("# A heading, here\n")
    page = tmp_path / "page.md"
    text = (
        "[ok](there.md) [ok](there.md#a-heading-here) [web](https://example.org/nowhere)\n"
        "[gone](missing.md) [bad anchor](there.md#nowhere) ![img](gone.png)\n"
        "`[in code](not-checked.md)`\n\n```\n[in a block](not-checked.md)\n```\n"
    )
    page.write_text(text)
    broken = broken_links(text, page)
    assert [b.split()[0] for b in broken] == ["missing.md", "there.md#nowhere", "gone.png"]
