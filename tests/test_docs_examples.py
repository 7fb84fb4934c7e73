"""Every example of README.md and docs/*.md runs as a user pastes it.

Each file's ```python and ```bash blocks run in document order in one scratch directory (a user
following the page), with ``HOME`` there (so ``~/homefire-store`` is scratch too), the bundled
sample data as ``data.jsonl`` / ``prefs.jsonl`` / ``pairs.jsonl``, and ``.venv``, ``scripts``
and ``Makefile`` linked from the repository. Two changes keep it offline and quick, both
listed in :data:`STAND_INS`: hub models are replaced by the built-in tiny model, and recipe runs
stop after :data:`MAX_STEPS` steps. What is not run here says why: :data:`NOT_RUN` (a bash line)
or a ``<!-- docs-test: ... -->`` comment right above a block naming the test that runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "training" / "data"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MAX_STEPS = 20
"""Recipe runs stop here (the demos' 150 steps would take minutes); two checkpoints of an
interval-10 run still exist."""

STAND_INS = {
    "Qwen/Qwen3-0.6B": "homefire/tiny-qwen3",  # no hub downloads on a test machine
}
"""Text replaced in every block before it runs."""

NOT_RUN = {
    "make test": "it is this suite",
    "make lint": "ruff is run by CI's lint step",
    ".venv/bin/python -m pytest": "it is this suite",
    ".venv/bin/pip install": "installs packages (the dev extra already has them)",
    "torchrun": "tests/test_distributed.py runs the README's torchrun commands",
    ".venv/bin/python scripts/trainer_server.py": "a server that runs until stopped: "
    "tests/test_trainer_server.py and tests/test_tinker_cookbook.py run it",
    ".venv/bin/python scripts/serve.py": "a server that runs until stopped: "
    "tests/test_serving.py runs it",
    "curl ": "talks to a running server (tests/test_serving.py covers /v1/hotload)",
    "export TINKER_": "settings for a running server",
}
"""Bash lines (by prefix) that are not run, and why."""

MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")


@dataclass
class Block:
    path: Path
    line: int
    language: str
    code: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced python and bash blocks of ``path``, with the docs-test comment above each."""
    found, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(before)
        if fence.group(1) in ("python", "bash"):
            found.append(Block(path, i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                               marker.group(1) if marker else None))
        i = end + 1
    return found


def _scratch(tmp_path: Path) -> dict[str, str]:
    """The directory a user works in, and the environment the blocks run with."""
    (tmp_path / ".venv").symlink_to(sys.prefix)  # this suite's virtual environment
    for name in ("scripts", "Makefile"):
        (tmp_path / name).symlink_to(REPO / name)
    shutil.copy(DATA / "sample_chats.jsonl", tmp_path / "data.jsonl")
    shutil.copy(DATA / "sample_preferences.jsonl", tmp_path / "prefs.jsonl")
    shutil.copy(DATA / "sample_pairs.jsonl", tmp_path / "pairs.jsonl")
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
           "HOMEFIRE_STORAGE_ROOT": str(tmp_path / "default-store"),
           "TINKER_TELEMETRY": "0", "MPLBACKEND": "Agg"}
    # The tiny models are built once per test session (conftest), not once per HOME.
    env.setdefault("HOMEFIRE_CACHE_DIR", os.path.expanduser("~/.cache/homefire"))
    return env


def _prepare_python(code: str) -> str:
    for text, stand_in in STAND_INS.items():
        code = code.replace(text, stand_in)
    # A recipe's Config(...) stops after MAX_STEPS, as the bash commands do.
    if re.search(r"from training\.recipes\.\w+ import .*Config", code):
        code = re.sub(r"\bConfig\(", f"Config(max_steps={MAX_STEPS}, ", code)
    return code


def _prepare_bash(code: str) -> tuple[str, list[tuple[str, str]]]:
    """The block with continuation lines joined, lines in NOT_RUN commented out (returned with
    their reasons), and every recipe command stopped after MAX_STEPS."""
    for text, stand_in in STAND_INS.items():
        code = code.replace(text, stand_in)
    out, skipped = [], []
    for line in code.replace("\\\n", " ").splitlines():
        command = line.split("  #")[0].split(" # ")[0].rstrip()
        prefix = next((p for p in NOT_RUN if command.lstrip().startswith(p)), None)
        if prefix is not None:
            skipped.append((command.strip(), prefix))
            continue
        if command.lstrip().startswith("make demo"):
            # the demo itself, without the set-up (this suite runs in the set-up's venv)
            command = f"make -o setup demo PY={sys.executable}"
        elif re.match(r"\s*\.venv/bin/python -m recipes\.", command):
            command += f" max_steps={MAX_STEPS}"
        out.append(command)
    return "set -euo pipefail\n" + "\n".join(out) + "\n", skipped


def _run(block: Block, cwd: Path, env: dict[str, str]) -> str:
    if block.language == "python":
        argv = [sys.executable, "-c", _prepare_python(block.code)]
    else:
        script, _ = _prepare_bash(block.code)
        argv = ["bash", "-c", script]
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"{block.where} ({block.language}) failed with exit code {done.returncode}:\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def _check_marker(block: Block) -> None:
    """A block another test runs names that test, and the test exists."""
    assert block.marker is not None
    named = re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", block.marker)
    assert named, f"{block.where}: docs-test comment {block.marker!r} names no test"
    for file, test in named:
        source = (REPO / file).read_text()
        assert not test or f"def {test}(" in source, f"{block.where}: no {file}::{test}"


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_doc_examples_run(doc, tmp_path, tiny_model_dir):
    path = next(d for d in DOCS if d.name == doc)
    todo = blocks(path)
    if not todo:
        pytest.skip(f"{doc} has no python or bash blocks")
    env = _scratch(tmp_path)
    ran = 0
    for block in todo:
        if block.marker is not None:
            _check_marker(block)
            continue
        _run(block, tmp_path, env)
        ran += 1
    assert ran or all(b.marker for b in todo)


def test_every_not_run_rule_is_still_needed():
    """Each NOT_RUN prefix still matches a line of the docs (a stale rule would hide a new
    command that starts the same way)."""
    used = {prefix for doc in DOCS for b in blocks(doc) if b.language == "bash"
            and b.marker is None for _, prefix in _prepare_bash(b.code)[1]}
    assert set(NOT_RUN) - used == set()
