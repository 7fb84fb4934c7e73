"""scripts/inspect_run.py: the status of a finished run and of an interrupted one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from training.recipes.sft_loop import Config, main
from training.sdk.store import CheckpointStore
from training.utils import InfraConfig

from .conftest import TEST_MODEL

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "inspect_run.py"
_spec = importlib.util.spec_from_file_location("inspect_run", SCRIPT)
inspect_run = importlib.util.module_from_spec(_spec)
sys.modules["inspect_run"] = inspect_run
_spec.loader.exec_module(inspect_run)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    base = tmp_path_factory.mktemp("inspect")
    (base / "chats.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n"
        for i in range(24)))
    main(Config(log_path=str(base / "run"), base_model=TEST_MODEL,
                dataset=str(base / "chats.jsonl"), batch_size=4, max_steps=8,
                dcp_save_interval=2, keep_last_n=1, output_model_id="inspected-model",
                infra=InfraConfig(storage_root=str(base / "store"), num_threads=1,
                                  mixed_precision="no")))
    torch.set_num_threads(threads)
    return base


def _report(capsys, *args: str) -> str:
    assert inspect_run.main([*args]) == 0
    return capsys.readouterr().out


def test_finished_run(finished: Path, capsys):
    out = _report(capsys, str(finished / "run"))
    rows = [json.loads(line) for line in (finished / "run" / "checkpoints.jsonl").open()]
    job, sampler = rows[-1]["source_job_id"], rows[-1]["sampler_path"]
    assert f"recipe sft_loop, base model {TEST_MODEL}, job {job}" in out
    assert "Steps: 8 checkpointed of 8 (metrics through step 8)" in out
    lines = out.splitlines()
    assert any(line.split() == ["step-2", "step", "2", "STATE", "(deleted", "by",
                                "keep_last_n)"] for line in lines)
    assert any(line.split()[:6] == ["step-6", "step", "6", "STATE", "state", "ok"]
               for line in lines)
    assert (f"BOTH                         state ok; sampler {sampler} ok; promoted as "
            f"accounts/local/models/inspected-model") in out
    assert "Next: the run is complete: a rerun changes nothing" in out
    assert (f"Promotable: step 8; promote the latest with: python scripts/promote_checkpoint.py "
            f"--checkpoints-jsonl {finished / 'run' / 'checkpoints.jsonl'} --step 8") in out


def test_interrupted_run(finished: Path, tmp_path: Path, capsys):
    """Rolled back to step 6 with a torn line and a half-written step-8 state."""
    log = tmp_path / "run"
    log.mkdir()
    (log / "run.json").write_text((finished / "run" / "run.json").read_text())
    lines = (finished / "run" / "checkpoints.jsonl").read_text().splitlines()
    (log / "checkpoints.jsonl").write_text("\n".join(lines[:3]) + '\n{"name": "step-8", "st')
    (log / "metrics.jsonl").write_text((finished / "run" / "metrics.jsonl").read_text())
    job = json.loads(lines[0])["source_job_id"]
    store = CheckpointStore(str(finished / "store"))
    half = Path(store.state_dir(job, "step-10"))
    half.mkdir()
    try:
        out = _report(capsys, str(log))
    finally:
        half.rmdir()
    assert "Steps: 6 checkpointed of 8 (metrics through step 8)" in out
    assert f"(last line of {log / 'checkpoints.jsonl'} is torn by a crash" in out
    assert "incomplete checkpoint directories (interrupted saves, removed by the next run): " \
           "states/step-10" in out
    assert "Next: a rerun resumes from step-6 (step 6, 24 examples) and trains steps 7-8" in out
    assert "Promotable: nothing yet" in out


def test_not_a_run(tmp_path: Path, capsys):
    assert inspect_run.main([str(tmp_path)]) == 2
    assert f"{tmp_path} holds no run (no run.json or checkpoints.jsonl)" in capsys.readouterr().err


def test_json_output(finished: Path, capsys):
    data = json.loads(_report(capsys, str(finished / "run"), "--json"))
    assert [r["step"] for r in data["checkpoints"]] == [2, 4, 6, 8]
    assert data["run"]["total_steps"] == 8 and data["run"]["recipe"] == "sft_loop"
