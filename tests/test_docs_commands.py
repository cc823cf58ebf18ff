"""Every shell command in README.md and docs/*.md runs as written (offline, tiny stand-ins).

Slow (20-40 minutes on 2 busy cores; .ci/run runs it after the suite): ``python -m pytest -m docs``.
What is substituted, and which commands are not run and why, is in ``tests/docs_harness.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess

import pytest
from docs_harness import (
    FRESH,
    NOT_RUN,
    PATHS,
    extract_blocks,
    logical_lines,
    prepare_script,
    shell_variables,
)

BLOCKS = extract_blocks()
BLOCK_TIMEOUT = 300  # seconds per block: a hang fails with the block named, not the whole suite


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    from docs_harness import build_sandbox

    root = tmp_path_factory.mktemp("docs-sandbox")
    state = {"root": root, "env": build_sandbox(root), "used": set(), "skipped": [], "ran": 0}
    state["port"] = _free_port()
    yield state
    pids = root / "background.pids"
    if pids.is_file():
        for pid in pids.read_text().split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGTERM)
    print("\ndocs commands not run here:\n  " + "\n  ".join(state["skipped"]))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_blocks_are_found():
    files = {b.file for b in BLOCKS}
    assert "README.md" in files and "docs/quickstart.md" in files
    assert sum(len(logical_lines(b.text)) for b in BLOCKS) > 50


@pytest.mark.docs
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_docs_block_runs(block, sandbox):
    variables = sandbox.setdefault("variables", {})
    before = variables.get(block.file, "")
    script = prepare_script(
        block, sandbox["root"], sandbox["used"], sandbox["skipped"], sandbox["port"], before=before
    )
    variables[block.file] = "\n".join(v for v in (before, shell_variables(block)) if v)
    aside = sandbox["root"] / ".aside"
    command, paths = FRESH.get(block.file, (None, []))
    fresh = [p for p in paths if command in block.text and (sandbox["root"] / p).exists()]
    for rel in fresh:
        (aside / rel).parent.mkdir(parents=True, exist_ok=True)
        (sandbox["root"] / rel).rename(aside / rel)
    try:
        _run_block(block, script, sandbox)
    finally:
        for rel in fresh:
            shutil.rmtree(sandbox["root"] / rel, ignore_errors=True)
            (aside / rel).rename(sandbox["root"] / rel)


def _run_block(block, script, sandbox) -> None:
    try:
        result = subprocess.run(
            ["bash", "-eo", "pipefail", "-x", "-c", script],
            cwd=sandbox["root"],
            env=sandbox["env"],
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.id}: still running after {BLOCK_TIMEOUT} s:\n{(exc.stderr or '')[-3000:]}")
    sandbox["ran"] += 1
    logs = sandbox["root"] / "logs"
    logs.mkdir(exist_ok=True)
    name = block.id.replace("/", "_").replace(":", "_")
    (logs / f"{name}.log").write_text(f"exit {result.returncode}\n{result.stderr}\n{result.stdout}")
    assert result.returncode == 0, (
        f"{block.id} failed (exit {result.returncode}); the last lines of its output:\n"
        f"{result.stderr[-4000:]}\n{result.stdout[-1000:]}"
    )


@pytest.mark.docs
def test_every_not_run_entry_still_matches_a_command(sandbox):
    if sandbox["ran"] < len(BLOCKS):
        pytest.skip("run the whole file: the list is checked against every block")
    stale = [pattern for pattern in NOT_RUN if pattern not in sandbox["used"]]
    assert not stale, f"NOT_RUN entries that match no command any more (remove them): {stale}"


def test_every_path_stand_in_is_still_used_by_a_command():
    from docs_harness import REPO

    text = "\n".join(b.text for b in BLOCKS) + "".join(p.read_text() for p in REPO.glob("recipes/*.yaml"))
    unused = [p for p in PATHS if p.removeprefix("home/") not in text]
    assert not unused, f"PATHS entries no command uses any more (remove them): {unused}"


def test_prepare_script_applies_the_tables(tmp_path):
    from docs_harness import Block

    text = (
        "D=data/x\n"
        "pip install -e .   # comment\n"
        "torchrun --nproc_per_node=8 -m vembed eval retrieval --model RUN/final \\\n"
        "    --data $D/test.jsonl\n"
        "curl -s localhost:8000/health\n"
    )
    block = Block("docs/x.md", 3, text)
    used, skipped = set(), []
    script = prepare_script(block, tmp_path, used, skipped, port=4321, before="E=1")
    lines = script.splitlines()
    assert lines[0] == "E=1" and lines[1] == "D=data/x"
    assert lines[2].startswith(": not run here:") and r"^pip install" in used
    assert (
        " ".join(lines[3].split())
        == "vembed eval retrieval --model runs/sop_dinov2_base_lora/final --data $D/test.jsonl"
    )
    assert "localhost:4321/health" in script
    assert any("one process" in s for s in skipped) and any("pip install" in s for s in skipped)
    assert shell_variables(block) == "D=data/x"
