"""Background (async) train-state saves: what is visible when, and what a failure leaves."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import TEST_MODEL
from training.sdk import AdamParams, Datum, ModelInput, ServiceClient
from training.sdk.store import CheckpointNotFoundError, StoreError
from training.utils.checkpoints import CheckpointLog, CheckpointSaveError, TrainingCheckpoints


def _client(store_root: str):
    service = ServiceClient(store_root, mixed_precision="no", device="cpu", async_saves=True)
    return service.create_training_client(TEST_MODEL)


def _train_step(client) -> None:
    tokens = list(range(5, 30))
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:])})
    client.forward_backward([datum]).result()
    client.optim_step(AdamParams(learning_rate=1e-2)).result()


@pytest.fixture
def held_writes(monkeypatch):
    """Make background DCP writes wait until the test releases them."""
    release = threading.Event()
    real = dcp.FileSystemWriter.write_data

    def write_data(self, plan, planner):
        assert release.wait(30), "the test never released the write"
        return real(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", write_data)
    return release


def test_async_save_is_invisible_until_committed_and_holds_the_weights_of_its_call(
        store_root, tiny_model_dir, held_writes):
    client = _client(store_root)
    _train_step(client)
    saved = {k: v.detach().clone() for k, v in client.model.state_dict().items()}
    future = client.save_state("s1", user_state={"cursor": 7})
    assert not future.done() and client.saves_in_flight == 1
    with pytest.raises(CheckpointNotFoundError):
        client.store.get_state(client.job_id, "s1")
    _train_step(client)  # the weights move on while the write waits
    held_writes.set()
    assert future.result(timeout=30).name == "s1"
    assert client.saves_in_flight == 0
    client.store.get_state(client.job_id, "s1")

    loaded = client.load_state_with_optimizer(future.result().path).result()
    assert loaded.user_state == {"cursor": 7}
    now = client.model.state_dict()
    assert all(torch.equal(saved[k], now[k]) for k in saved)


def test_failed_async_save_is_reported_and_never_recorded(store_root, tiny_model_dir, tmp_path,
                                                          monkeypatch):
    def write_data(self, plan, planner):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", write_data)
    client = _client(store_root)
    _train_step(client)
    checkpoints = TrainingCheckpoints(client, tmp_path / "run")
    with pytest.raises(CheckpointSaveError) as excinfo:
        # The error surfaces at save() if the write already failed, else at wait().
        checkpoints.save("step-1", step=1, data_consumed=4)
        checkpoints.wait()
    assert "saving checkpoint 'step-1'" in str(excinfo.value)
    assert "No space left on device" in str(excinfo.value)
    assert CheckpointLog(tmp_path / "run").rows() == []
    assert client.store.incomplete_entries(client.job_id) == []  # partial files removed
    with pytest.raises(StoreError):
        client.save_state("s2").result()  # the client itself reports it too, if asked


def test_rows_of_async_saves_stay_in_step_order(store_root, tiny_model_dir, tmp_path,
                                                held_writes):
    client = _client(store_root)
    checkpoints = TrainingCheckpoints(client, tmp_path / "run")
    _train_step(client)
    row = checkpoints.save("step-1", step=1, data_consumed=4)
    assert "state_path" not in row and CheckpointLog(tmp_path / "run").rows() == []
    held_writes.set()
    _train_step(client)
    checkpoints.save("step-2", step=2, data_consumed=8, kind="both")
    rows = CheckpointLog(tmp_path / "run").rows()
    assert [r["name"] for r in rows] == ["step-1", "step-2"]
    assert row["state_path"] == rows[0]["state_path"]
    assert Path(client.store.state_dir(client.job_id, "step-1")).exists()


def test_a_both_save_writes_its_state_in_the_call_without_a_staging_copy(store_root, tmp_path):
    """A BOTH save (the final one) waits for its state anyway: no staging copy of weights and
    optimizer is made for it, which at real sizes is what could run out of memory."""
    client = _client(store_root)
    _train_step(client)
    checkpoints = TrainingCheckpoints(client, tmp_path / "run")
    row = checkpoints.save("final", step=1, data_consumed=4, kind="both")
    assert row.state_path and row.sampler_path
    assert client._staging._buffers is None  # nothing was staged
    checkpoints.save("mid", step=2, data_consumed=8, kind="state")  # STATE: in the background
    checkpoints.wait()
    assert client._staging._buffers is not None
