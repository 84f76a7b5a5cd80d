"""The README's project-structure tree is the repository: every tracked file is in it with a
purpose, and nothing in it is missing from git. The README's two commands are the real ones."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TREE_START = "<!-- tree:start -->"
TREE_END = "<!-- tree:end -->"
ENTRY = re.compile(r"^(?P<indent>(?:│   |    )*)(?:├── |└── )(?P<name>\S+)(?:\s{2,}(?P<purpose>.+))?$")


def readme_tree() -> dict[str, str]:
    """Path -> purpose for every entry of the tree block (folders end with '/')."""
    text = README.read_text()
    block = text.split(TREE_START, 1)[1].split(TREE_END, 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("```")]
    entries: dict[str, str] = {}
    parents: list[str] = []
    for line in lines[1:]:  # the first line is the repository root
        match = ENTRY.match(line)
        assert match, f"README tree line does not parse: {line!r}"
        depth = len(match["indent"]) // 4
        parents = parents[:depth]
        path = "".join(parents) + match["name"]
        entries[path] = (match["purpose"] or "").strip()
        if match["name"].endswith("/"):
            parents.append(match["name"])
    return entries


def tracked_files() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return {path for path in out.stdout.splitlines() if not path.endswith(".gitkeep")}


def test_readme_tree_lists_exactly_the_tracked_files() -> None:
    tree = readme_tree()
    files = {path for path in tree if not path.endswith("/")}
    tracked = tracked_files()
    assert sorted(tracked - files) == [], "tracked but missing from the README tree"
    assert sorted(files - tracked) == [], "in the README tree but not tracked"


def test_every_folder_in_the_tree_exists_and_every_entry_says_why() -> None:
    for path, purpose in readme_tree().items():
        assert (REPO / path).exists(), path
        if path.endswith("/") or "/" not in path.rstrip("/") or path.endswith(".py"):
            assert purpose, f"{path}: give it a one-line purpose in the README tree"


def test_readme_gives_the_two_commands_ci_uses() -> None:
    text = README.read_text()
    assert re.search(r"^sh run\.sh +# ", text, re.MULTILINE), "the bring-up command"
    assert re.search(r"^sh run\.sh test +# ", text, re.MULTILINE), "the test command"
    ci_commands = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "step", "echo"))
    ]
    assert "sh run.sh test" in ci_commands, "CI must run exactly the README's test command"
