"""checkpoints.jsonl handling, TrainingCheckpoints, metrics.jsonl and the LR schedule."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from training.utils import CheckpointKind, CheckpointLog, ConfigError, TrainingCheckpoints
from training.utils.checkpoints import check_run_identity, read_run_identity
from training.utils.lr_schedule import lr_at
from training.utils.metrics import MetricsLogger, read_metrics

ROW = {"name": "step-1", "step": 1, "data_consumed": 4, "state_path": "cross_job://j/step-1",
       "source_job_id": "j", "base_model": "m"}


def test_torn_last_line_is_ignored_then_repaired(tmp_path):
    log = CheckpointLog(tmp_path)
    log.append(ROW)
    with open(log.path, "ab") as f:
        f.write(b'{"name": "step-2", "st')  # a crash in the middle of an append
    assert [r.to_dict() for r in log.rows()] == [ROW]
    row2 = {**ROW, "name": "step-3", "step": 3}
    log.append(row2)
    assert [r.to_dict() for r in log.rows()] == [ROW, row2]
    assert log.path.read_text().count("\n") == 2


def test_complete_last_line_without_newline_is_kept(tmp_path):
    log = CheckpointLog(tmp_path)
    log.path.write_text(json.dumps(ROW))
    assert [r.to_dict() for r in log.rows()] == [ROW]
    log.append({**ROW, "step": 2})
    assert [r["step"] for r in log.rows()] == [1, 2]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    log = CheckpointLog(tmp_path)
    log.path.write_text(json.dumps(ROW) + "\n{oops\n" + json.dumps(ROW) + "\n")
    with pytest.raises(ConfigError, match=r"checkpoints.jsonl:2: corrupt checkpoint row"):
        log.rows()


def test_last_resumable_and_latest_promotable(tmp_path):
    log = CheckpointLog(tmp_path)
    assert log.last_resumable() is None and log.latest_promotable() is None
    log.append(ROW)
    sampler_only = {"name": "s", "step": 2, "data_consumed": 8, "sampler_path": "s-1234abcd",
                    "source_job_id": "j", "base_model": "m"}
    log.append(sampler_only)
    assert log.last_resumable().to_dict() == ROW
    assert log.latest_promotable().to_dict() == sampler_only
    assert log.latest_promotable(step=1) is None


def test_run_identity_is_recorded_then_enforced(tmp_path):
    check_run_identity(tmp_path, {"base_model": "a", "seed": 1}, resuming=False)
    assert read_run_identity(tmp_path)["base_model"] == "a"
    check_run_identity(tmp_path, {"base_model": "a", "seed": 1}, resuming=True)
    with pytest.raises(ConfigError, match=r"seed +saved 1 +new 2"):
        check_run_identity(tmp_path, {"base_model": "a", "seed": 2}, resuming=True)
    # A fresh run (nothing to resume) takes over the directory.
    check_run_identity(tmp_path, {"base_model": "b", "seed": 2}, resuming=False)
    assert read_run_identity(tmp_path)["base_model"] == "b"


def test_training_checkpoints_kinds_and_rng_restore(make_client, tmp_path):
    client = make_client()
    checkpoints = TrainingCheckpoints(client, tmp_path / "log")
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state_row = checkpoints.save("step-1", step=1, data_consumed=4, user_state={"k": "v"})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    sampler_row = checkpoints.save("step-2", step=2, data_consumed=8,
                                   kind=CheckpointKind.SAMPLER)
    both_row = checkpoints.save("step-3", step=3, data_consumed=12, promotable=True)

    assert "state_path" in state_row and "sampler_path" not in state_row
    assert "sampler_path" in sampler_row and "state_path" not in sampler_row
    assert "state_path" in both_row and "sampler_path" in both_row
    assert checkpoints.log.rows() == [state_row, sampler_row, both_row]

    resumed = checkpoints.resume(state_row)
    assert (resumed.step, resumed.data_consumed, resumed.user_state) == (1, 4, {"k": "v"})
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_promote_latest_refuses_a_log_without_promotable_rows(make_client, tmp_path):
    client = make_client()
    checkpoints = TrainingCheckpoints(client, tmp_path / "log")
    checkpoints.save("step-1", step=1, data_consumed=4)
    with pytest.raises(ConfigError, match="no promotable checkpoint.*kind=SAMPLER or BOTH"):
        checkpoints.promote_latest("my-model")
    checkpoints.save("step-2", step=2, data_consumed=8, kind=CheckpointKind.BOTH)
    model = checkpoints.promote_latest("my-model")
    assert model["name"].endswith("/models/my-model")


def test_metrics_rows_after_the_resume_step_are_dropped(tmp_path):
    with MetricsLogger(tmp_path) as metrics:
        for step in range(1, 6):
            metrics.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn by a crash
    with MetricsLogger(tmp_path, start_step=3) as metrics:
        metrics.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_lr_schedules():
    assert lr_at(0, 10, 1.0, "constant") == 1.0
    assert lr_at(0, 10, 1.0, "linear") == 1.0
    assert lr_at(5, 10, 1.0, "linear") == pytest.approx(0.5)
    assert lr_at(5, 10, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(0, 10, 1.0, "linear", warmup_steps=4) == pytest.approx(0.25)
    assert lr_at(3, 10, 1.0, "linear", warmup_steps=4) == pytest.approx(1.0)
    assert lr_at(10, 10, 1.0, "linear", min_lr_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_schedule='step'"):
        lr_at(0, 10, 1.0, "step")


def test_checkpoint_row_round_trips_and_keeps_unknown_keys(tmp_path):
    from training.utils.checkpoints import CheckpointRow

    cookbook = {"name": "000008", "batch": 8, "state_path": "tinker://r/weights/000008",
                "loop_state": {"epoch": 1}}
    row = CheckpointRow.from_dict(cookbook)
    assert (row.name, row.step, row.state_path) == ("000008", None, cookbook["state_path"])
    assert row.extra == {"batch": 8, "loop_state": {"epoch": 1}} and row.resumable
    assert row.to_dict() == cookbook and row["batch"] == 8 and "sampler_path" not in row
    log = CheckpointLog(tmp_path)
    log.append(row)
    log.append({**ROW, "state_corrupt": True})
    assert [r.to_dict() for r in log.rows()] == [cookbook, {**ROW, "state_corrupt": True}]
    assert log.last_resumable().name == "000008"  # the corrupt one is never resumed from
    log.path.write_text(json.dumps(ROW) + "\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ConfigError, match=r"checkpoints.jsonl:2: a checkpoint row needs a 'name'"):
        log.rows()
