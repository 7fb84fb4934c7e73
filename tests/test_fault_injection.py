"""SIGKILL real SFT runs at random moments, rerun after each kill, and end bitwise equal to an
uninterrupted run (issue #8, crash safety).

Each chain is one run killed again and again: every rerun resumes and becomes the next victim,
so 20 kills cost ~22 process launches rather than 20 runs from scratch. Kills land through the
``HOMEFIRE_FAULT_POINT`` test hook (see :mod:`training.faults`): a seeded RNG picks the point
(after a step, mid-DCP-save, mid-append of checkpoints.jsonl) and its hit count, then the last
kills of a chain target the final sampler save, the final row's append and the promotion.
After every kill the invariants are checked: checkpoints.jsonl parses (a torn last line is
tolerated) and names only committed checkpoints.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.recipes.sft_loop import Config, main
from training.sdk import ModelRegistry
from training.sdk.store import CheckpointStore
from training.utils import InfraConfig
from training.utils.checkpoints import CheckpointLog
from training.utils.metrics import read_metrics

from .conftest import TEST_MODEL

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
STEPS = 12  # 24 chats x 2 epochs / batch 4
MODEL_ID = "fault-test-model"
RANDOM_KILLS = 7  # per chain, plus 3 aimed at the end: 2 chains give 20 kills
MID_RUN_POINTS = ("step", "commit.state", "checkpoints.append")


def _write_chats(path: Path) -> None:
    import json

    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n"
        for i in range(24)))


def _settings(base: Path) -> dict:
    return dict(base_model=TEST_MODEL, dataset=str(base / "chats.jsonl"), batch_size=4,
                epochs=2, seed=3, learning_rate=1e-3, dcp_save_interval=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("faults")
    _write_chats(base / "chats.jsonl")
    return base


@pytest.fixture(scope="module")
def reference(base: Path) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    result = main(Config(log_path=str(base / "reference"), **_settings(base),
                         infra=InfraConfig(storage_root=str(base / "reference-store"),
                                           num_threads=1, mixed_precision="no")))
    torch.set_num_threads(threads)
    row = result.final_checkpoint
    store = CheckpointStore(str(base / "reference-store"))
    return load_file(f"{store.sampler_dir(row['source_job_id'], row['sampler_path'])}"
                     f"/model.safetensors")


def _launch(log: Path, store: Path, base: Path, fault: str | None) -> subprocess.CompletedProcess:
    overrides = [f"{k}={v}" for k, v in _settings(base).items()]
    cmd = [sys.executable, "-m", "recipes.sft_loop", f"log_path={log}", *overrides,
           f"output_model_id={MODEL_ID}", f"infra.storage_root={store}",
           "infra.num_threads=1", "infra.mixed_precision=no"]
    env = {k: v for k, v in os.environ.items() if k != "HOMEFIRE_FAULT_POINT"}
    if fault is not None:
        env["HOMEFIRE_FAULT_POINT"] = fault
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _check_invariants(log: Path, store: CheckpointStore) -> list[dict]:
    """checkpoints.jsonl parses and every checkpoint it names is committed."""
    rows = CheckpointLog(log).rows()
    for row in rows:
        job = row["source_job_id"]
        if row.get("state_path"):
            assert store.read_meta(store.state_dir(job, row["name"])) is not None, row
        if row.get("sampler_path"):
            assert store.read_meta(store.sampler_dir(job, row["sampler_path"])) is not None, row
    read_metrics(log)  # a torn metrics line is skipped, never an error
    return rows


def _random_fault(rng: random.Random) -> str:
    """A mid-run fault. Hit counts of 1-2 advance a launch by at most one checkpoint, so the
    random kills of a chain (7 x 1 of 12 steps) always land before the final save."""
    return f"{rng.choice(MID_RUN_POINTS)}:{rng.randint(1, 2)}"


# Aimed at the end of the run: the final BOTH save's sampler snapshot, the final row's append
# (the launch then resumes at step 11 and runs one step, so it is its first append), and the
# promotion that follows a complete final row.
END_FAULTS = ("commit.sampler:1", "checkpoints.append:1", "commit.model:1")


@pytest.mark.parametrize("fault_seed", [1, 2])
def test_kill_9_at_random_moments_then_rerun_is_bitwise_equal(base, reference, fault_seed):
    log, store_root = base / f"chain-{fault_seed}", base / f"store-{fault_seed}"
    store = CheckpointStore(str(store_root))
    rng = random.Random(fault_seed)
    faults = [_random_fault(rng) for _ in range(RANDOM_KILLS)] + list(END_FAULTS)
    for fault in faults:
        resume = next((r["step"] for r in reversed(CheckpointLog(log).rows())
                       if r.get("state_path")), 0)
        result = _launch(log, store_root, base, fault)
        assert result.returncode == -signal.SIGKILL, (
            f"{fault} (resume at {resume}) did not kill the run: rc {result.returncode}\n"
            f"{result.stdout[-2000:]}{result.stderr[-3000:]}")
        _check_invariants(log, store)

    final = _launch(log, store_root, base, None)
    assert final.returncode == 0, final.stderr[-3000:]
    rows = _check_invariants(log, store)
    # No torn line is left: the clean run's appends cut it off.
    lines = (log / "checkpoints.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    assert rows[-1]["step"] == STEPS and rows[-1]["sampler_path"]

    job = rows[-1]["source_job_id"]
    got = load_file(f"{store.sampler_dir(job, rows[-1]['sampler_path'])}/model.safetensors")
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference), faults
    assert [m["step"] for m in read_metrics(log)] == list(range(1, STEPS + 1))

    # One job, no half-written checkpoint left, and the promoted model is the final weights.
    assert store.list_jobs() == [job]
    assert store.incomplete_entries(job) == []
    model = ModelRegistry(store).get_model(MODEL_ID)
    promoted = load_file(f"{model['path']}/model.safetensors")
    assert all(torch.equal(promoted[k], got[k]) for k in got)
