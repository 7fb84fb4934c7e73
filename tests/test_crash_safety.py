"""Crash safety in process: disk full / read-only store during a save, clean-up of half-written
checkpoints, retention (keep_last_n) and TTL never deleting what a resume needs, and the
final save of a resumed run never re-writing its resume point. (SIGKILLs of real runs are in
test_fault_injection.py.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import PreTrainedModel

from training.recipes.sft_loop import Config, main
from training.sdk import AdamParams, Datum, ModelInput, ModelRegistry, TensorData
from training.sdk.store import CheckpointStore
from training.utils import CheckpointKind, InfraConfig, TrainingCheckpoints
from training.utils.checkpoints import CheckpointLog, CheckpointSaveError
from training.utils.metrics import read_metrics

from .conftest import TEST_MODEL, checkpoint_rows, final_sampler_weights


def _config(base: Path, log_name: str = "run", **overrides) -> Config:
    fields = dict(log_path=str(base / log_name), base_model=TEST_MODEL,
                  dataset=str(base / "chats.jsonl"), batch_size=4, epochs=2, max_steps=8,
                  dcp_save_interval=2, learning_rate=1e-3, seed=3,
                  infra=InfraConfig(storage_root=str(base / "store"), num_threads=1,
                                    mixed_precision="no"))
    fields.update(overrides)
    return Config(**fields)


def _write_chats(path: Path, n: int = 24) -> None:
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n"
        for i in range(n)))


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of the uninterrupted 8-step run that every crashed run must reproduce."""
    threads = torch.get_num_threads()
    base = tmp_path_factory.mktemp("reference")
    _write_chats(base / "chats.jsonl")
    main(_config(base))
    torch.set_num_threads(threads)
    return final_sampler_weights(base, base / "run")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    _write_chats(tmp_path / "chats.jsonl")
    return tmp_path


# ------------------------------------------------------------------ disk full / read-only


def _fail_dcp_write(monkeypatch, name: str, error: OSError) -> None:
    real = dcp.FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if str(getattr(self, "path", "")).endswith(f"/states/{name}"):
            Path(self.path, "__0_0.distcp").write_bytes(b"\0" * 64)  # a partly written shard
            raise error
        return real(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", write_data)


def _fail_sampler_write(monkeypatch, error: OSError) -> None:
    def save_pretrained(self, directory, *args, **kwargs):
        Path(directory, "model.safetensors").write_bytes(b"\0" * 64)
        raise error

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)


def _fail_append(monkeypatch, error: OSError) -> None:
    real = CheckpointLog.append

    def append(self, row):
        if row["step"] == 6:
            raise error
        real(self, row)

    monkeypatch.setattr(CheckpointLog, "append", append)


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["state", "append", "sampler"])
def test_disk_full_during_a_save(base, monkeypatch, reference, where):
    """ENOSPC mid-save: a clear error naming the checkpoint, no row, the partial files gone,
    every earlier checkpoint still loads, and the rerun ends bitwise equal to no failure."""
    failing = "step-8" if where == "sampler" else "step-6"
    with monkeypatch.context() as patch:
        {"state": lambda: _fail_dcp_write(patch, "step-6", ENOSPC),
         "append": lambda: _fail_append(patch, ENOSPC),
         "sampler": lambda: _fail_sampler_write(patch, ENOSPC)}[where]()
        with pytest.raises(CheckpointSaveError) as excinfo:
            main(_config(base))
    message = str(excinfo.value)
    assert f"saving checkpoint '{failing}' (step {failing[5:]}" in message
    assert "No space left on device" in message
    assert "It was not recorded in" in message and "earlier checkpoints are intact" in message
    # The final BOTH save wrote its state, then failed on the sampler: no row for step 8.
    expected_resume = "step-6" if where == "sampler" else "step-4"
    assert f"then rerun to resume from {expected_resume}" in message

    log = base / "run"
    rows = checkpoint_rows(log)
    assert [r["step"] for r in rows] == ([2, 4, 6] if where == "sampler" else [2, 4])
    store = CheckpointStore(str(base / "store"))
    job = rows[0]["source_job_id"]
    assert store.incomplete_entries(job) == []  # the partial files were removed at once
    for row in rows:
        store.get_state(job, row["name"])  # committed, loadable entries

    result = main(_config(base))
    assert result.final_checkpoint["sampler_path"]
    got = final_sampler_weights(base, log)
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert [m["step"] for m in read_metrics(log)] == list(range(1, 9))


def _make_read_only(store_root: Path, patch: pytest.MonkeyPatch) -> list[Path]:
    """Block writes under ``store_root/jobs``: chmod where that works, else (as root, where
    chmod blocks nothing) make the store's directory creation fail with EROFS. Returns the
    chmod-ed directories, to restore."""
    dirs = [p for p in [store_root, *store_root.rglob("*")] if p.is_dir()]
    for path in dirs:
        path.chmod(0o555)
    probe = store_root / "jobs" / "probe"
    try:
        probe.mkdir()
    except PermissionError:
        return dirs
    probe.rmdir()
    for path in dirs:
        path.chmod(0o755)
    real_makedirs = os.makedirs

    def makedirs(name, *args, **kwargs):
        if str(name).startswith(str(store_root / "jobs")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(name))
        return real_makedirs(name, *args, **kwargs)

    patch.setattr("training.sdk.store.os.makedirs", makedirs)
    return []


def test_read_only_store(base, reference):
    """The store turns read-only before the step-6 save: a clear error, and the rerun (store
    writable again) resumes from step-4 and ends bitwise equal to an uninterrupted run."""
    config = _config(base)
    real_save = TrainingCheckpoints.save
    blocked: list[Path] = []
    with pytest.MonkeyPatch.context() as patch:
        def save(self, name, **kwargs):
            if name == "step-6":
                blocked.extend(_make_read_only(base / "store", patch))
            return real_save(self, name, **kwargs)

        patch.setattr(TrainingCheckpoints, "save", save)
        try:
            with pytest.raises(CheckpointSaveError) as excinfo:
                main(config)
        finally:
            for path in blocked:
                path.chmod(0o755)
    message = str(excinfo.value)
    assert "saving checkpoint 'step-6' (step 6, state)" in message
    assert "Read-only file system" in message or "Permission denied" in message
    assert "Free disk space on the store" in message and "then rerun to resume from step-4" in message
    assert [r["step"] for r in checkpoint_rows(base / "run")] == [2, 4]

    main(config)
    got = final_sampler_weights(base, base / "run")
    assert all(torch.equal(got[k], reference[k]) for k in reference)


# ------------------------------------------------------------------ incomplete checkpoints


def test_incomplete_checkpoints_of_the_run_are_removed_on_rerun(base, capsys):
    main(_config(base, max_steps=4))
    store = CheckpointStore(str(base / "store"))
    job = checkpoint_rows(base / "run")[0]["source_job_id"]
    # Leftovers of saves killed half-way (no meta.json), and one of another job.
    half_state = Path(store.state_dir(job, "step-6"))
    half_sampler = Path(store.sampler_dir(job, "step-8-0badf00d"))
    other_job = store.create_job(TEST_MODEL).job_id
    others = Path(store.state_dir(other_job, "step-1"))
    for path in (half_state, half_sampler, others):
        path.mkdir(parents=True)
        (path / "__0_0.distcp").write_bytes(b"partial")
    assert store.incomplete_entries(job) == [str(half_sampler), str(half_state)]

    main(_config(base, resume_overrides=["max_steps"]))  # extends the 4-step run to 8
    assert store.incomplete_entries(job) == []
    assert not half_sampler.exists()
    assert (others / "__0_0.distcp").exists()  # never touch another job's files
    assert [r["step"] for r in checkpoint_rows(base / "run")] == [2, 4, 6, 8]


def test_run_killed_before_its_first_checkpoint_reuses_its_job(base):
    """The rerun of a run that died before any row reattaches its job (no orphan job) and
    removes that job's half-written checkpoint."""
    config = _config(base, max_steps=2)
    with pytest.MonkeyPatch.context() as patch:
        _fail_dcp_write(patch, "step-2", OSError(errno.EIO, "simulated crash"))
        with pytest.raises(CheckpointSaveError):
            main(config)
    job = json.loads((base / "run" / "run.json").read_text())["job_id"]
    store = CheckpointStore(str(base / "store"))
    half = Path(store.state_dir(job, "step-2"))
    half.mkdir(parents=True)  # as a SIGKILL would have left it (no clean-up ran)
    assert checkpoint_rows(base / "run") == []

    result = main(config)
    assert result.final_checkpoint["source_job_id"] == job
    assert store.list_jobs() == [job]
    assert store.incomplete_entries(job) == []


# ------------------------------------------------------------------ retention and TTL


def test_keep_last_n_in_a_run(base):
    result = main(_config(base, dcp_save_interval=1, max_steps=6, keep_last_n=2))
    rows = checkpoint_rows(result.log_path)
    job = rows[0]["source_job_id"]
    store = CheckpointStore(str(base / "store"))
    assert [m.name for m in store.list_states(job)] == ["step-4", "step-5", "step-6"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r.get("state_deleted") for r in rows[:3]] == ["keep_last_n"] * 3
    assert all("state_path" not in r for r in rows[:3])
    assert all("state_path" in r for r in rows[3:])


def _step(client) -> None:
    tokens = list(range(5, 21))
    client.forward_backward([Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                                   loss_fn_inputs={"target_tokens": TensorData(
                                       data=tokens[1:], dtype="int64")})]).result()
    client.optim_step(AdamParams(learning_rate=1e-2)).result()


def test_retention_keeps_promotable_promoted_and_resume_checkpoints(make_client, tmp_path):
    client = make_client()
    checkpoints = TrainingCheckpoints(client, tmp_path / "log")
    for step in range(1, 6):
        _step(client)
        checkpoints.save(f"step-{step}", step=step, data_consumed=4 * step)
    # step-2 also has a promotable row; step-3's weights were promoted through the raw SDK.
    checkpoints.save("step-2", step=2, data_consumed=8, kind=CheckpointKind.SAMPLER)
    snapshot = client.save_weights_for_sampler_ext("step-3", checkpoint_type="base")
    registry = ModelRegistry(client.store)
    registry.promote_checkpoint(name=registry.checkpoint_name(client.job_id,
                                                              snapshot.snapshot_name),
                                output_model_id="kept-model")

    deleted = checkpoints.apply_retention(keep_last_n=1)
    assert deleted == ["step-1", "step-4"]
    assert client.list_checkpoints() == ["step-2", "step-3", "step-5"]
    rows = checkpoints.log.rows()
    assert [r["name"] for r in rows if r.get("state_deleted")] == ["step-1", "step-4"]
    assert checkpoints.log.last_resumable()["name"] == "step-5"
    assert checkpoints.resume().step == 5
    assert checkpoints.apply_retention(keep_last_n=1) == []  # idempotent
    assert checkpoints.apply_retention(keep_last_n=None) == []


def test_ttl_expiry_spares_what_a_resume_needs(make_client, tmp_path, monkeypatch):
    client = make_client()
    checkpoints = TrainingCheckpoints(client, tmp_path / "log")
    _step(client)
    row = checkpoints.save("step-1", step=1, data_consumed=4)
    # Recipe checkpoints never expire; a client-level save with a TTL does.
    assert client.store.read_meta(client.store.state_dir(client.job_id, "step-1")).expires_at \
        is None
    client.save_state("scratch", ttl_seconds=1).result()
    client.save_state("pinned", ttl_seconds=1).result()
    now = __import__("time").time()
    monkeypatch.setattr("training.sdk.store.time.time", lambda: now + 10)
    deleted = client.store.cleanup_expired(client.job_id, keep={"pinned"})
    assert deleted == ["states/scratch"]
    assert client.list_checkpoints() == [row["name"]]  # "pinned" is kept but expired: hidden
    assert Path(client.store.state_dir(client.job_id, "pinned"), "meta.json").exists()


def test_final_save_of_a_run_resumed_at_its_end_reuses_the_resume_state(base):
    """Resumed exactly at a lowered step budget, the final BOTH row records the existing
    step-4 state instead of deleting and re-writing it (a crash then would lose it)."""
    config = _config(base)
    main(config)
    log = base / "run"
    rows = checkpoint_rows(log)
    (log / "checkpoints.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    store = CheckpointStore(str(base / "store"))
    job = rows[0]["source_job_id"]
    meta_before = Path(store.state_dir(job, "step-4"), "meta.json").read_bytes()

    result = main(_config(base, max_steps=4, resume_overrides=["max_steps"]))
    final = result.final_checkpoint
    assert (final["step"], final["state_path"]) == (4, f"cross_job://{job}/step-4")
    assert final["sampler_path"].startswith("step-4-")
    assert Path(store.state_dir(job, "step-4"), "meta.json").read_bytes() == meta_before
    assert main(_config(base, max_steps=4)).already_complete
    shutil.rmtree(log)
