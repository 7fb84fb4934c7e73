"""A full disk, for real: the store on a small tmpfs (CI runs as root; elsewhere this skips).

Each save that no longer fits fails with one clear error naming the checkpoint and what to do;
nothing is recorded for it and every earlier checkpoint still loads.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from training.recipes.sft_loop import Config, main
from training.sdk.store import StoreError
from training.utils import InfraConfig

from .conftest import TEST_MODEL, checkpoint_rows


@pytest.fixture
def tmpfs(tmp_path: Path):
    """``tmpfs(size)``: a directory on a tmpfs of that size, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_disk(tmpfs) -> Path:
    """A 9 MB tmpfs: one train state of the test model fits, a few do not."""
    return tmpfs("9m")


def _config(tmp_path: Path, store: Path, **overrides) -> Config:
    fields = dict(log_path=str(tmp_path / "run"), base_model=TEST_MODEL, batch_size=4,
                  max_steps=12, dcp_save_interval=2, seed=3,
                  infra=InfraConfig(storage_root=str(store), num_threads=1,
                                    mixed_precision="no", async_checkpoint=False))
    fields.update(overrides)
    return Config(**fields)


def test_a_real_full_disk_stops_with_a_clear_error_and_loses_nothing(tmp_path, small_disk,
                                                                    tiny_model_dir):
    with pytest.raises(StoreError) as full:
        main(_config(tmp_path, small_disk / "store"))
    message = str(full.value)
    assert "No space left on device" in message
    assert "step-" in message  # the checkpoint that did not fit is named
    rows = checkpoint_rows(tmp_path / "run")
    assert rows, "nothing was saved before the disk filled: make the tmpfs larger"
    # Every recorded checkpoint still loads: free space (a bigger store) and rerun resumes.
    last = rows[-1]
    bigger = tmp_path / "bigger-store"
    os.system(f"cp -r {small_disk / 'store'} {bigger}")
    run_json = tmp_path / "run" / "run.json"
    run_json.write_text(run_json.read_text().replace(str(small_disk / "store"), str(bigger)))
    result = main(_config(tmp_path, bigger, resume_overrides=[]))
    assert result.steps == 12
    assert checkpoint_rows(tmp_path / "run")[len(rows) - 1] == last


def test_a_sampler_save_on_a_full_disk_is_a_store_error_naming_it(tmpfs, tiny_model_dir):
    from training.sdk import ServiceClient

    mount = tmpfs("600k")  # the test model's sampler snapshot (1.3 MB) does not fit
    client = ServiceClient(str(mount / "store"), device="cpu", mixed_precision="no") \
        .create_training_client(TEST_MODEL)
    with pytest.raises(StoreError, match=r"saving sampler snapshot 'final-.*' of job .* "
                                         r"failed in .*No space left on device"):
        client.save_weights_for_sampler_ext("final", checkpoint_type="base")
    assert client.store.list_samplers(client.job_id) == []  # nothing half-visible


def test_a_read_only_log_path_is_refused_before_anything_changes(tmp_path, tmpfs,
                                                                 tiny_model_dir):
    from training.utils.run import LogPathError

    read_only = tmpfs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    with pytest.raises(LogPathError, match=r"cannot use log_path .*Read-only file system.*"
                                           r"nothing was changed"):
        main(_config(tmp_path, tmp_path / "store", log_path=str(read_only / "run")))
    assert not (tmp_path / "store" / "jobs").exists()


def test_a_full_log_path_stops_naming_the_file_and_the_intact_checkpoint(tmp_path, tmpfs,
                                                                        tiny_model_dir):
    from training.utils.run import LogPathError

    log_disk = tmpfs("12k")  # a few metrics rows and checkpoint rows fit, not 60 steps' worth
    config = _config(tmp_path, tmp_path / "store", log_path=str(log_disk / "run"),
                     max_steps=60)
    with pytest.raises((LogPathError, StoreError)) as full:
        main(config)
    message = str(full.value)
    assert "No space left on device" in message
    assert "metrics.jsonl" in message or "checkpoints.jsonl" in message
    assert "intact" in message
    assert f"on log_path ({log_disk / 'run'})" in message or str(log_disk / "run") in message
    assert "the store" not in message  # the log_path is full, not the store


def test_a_promotion_on_a_full_disk_names_the_model_and_leaves_nothing_half_made(
        tmpfs, tiny_model_dir):
    from training.sdk import ModelRegistry, ServiceClient
    from training.sdk.registry import PromotionWriteError

    mount = tmpfs("2m")  # the snapshot (1.3 MB) fits, a second copy of it does not
    client = ServiceClient(str(mount / "store"), device="cpu", mixed_precision="no") \
        .create_training_client(TEST_MODEL)
    saved = client.save_weights_for_sampler_ext("final", checkpoint_type="base")
    registry = ModelRegistry(client.store)
    name = registry.checkpoint_name(client.job_id, saved.snapshot_name)
    with pytest.raises(PromotionWriteError) as full:
        registry.promote_checkpoint(name=name, output_model_id="full-disk",
                                    base_model=TEST_MODEL)
    message = str(full.value)
    assert "accounts/local/models/full-disk" in message
    assert "[Errno 28] No space left on device. Nothing was promoted" in message
    assert registry.list_models() == []  # no half-copied model is visible
    # The snapshot is intact: with more space, the same promotion succeeds.
    subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
    model = registry.promote_checkpoint(name=name, output_model_id="full-disk",
                                        base_model=TEST_MODEL)
    assert [m["name"] for m in registry.list_models()] == [model["name"]]


def test_a_reference_cache_write_on_a_full_disk_names_the_cache_file(tmp_path, tmpfs,
                                                                     tiny_model_dir):
    """DPO's reference log-probs are cached in the store; a full store stops the run with the
    cache file named, before any training step."""
    from training.recipes.dpo_loop import Config as DPOConfig
    from training.recipes.dpo_loop import main as dpo_main

    mount = tmpfs("8k")  # the job record fits, the reference log-probs of 400 pairs do not
    config = DPOConfig(log_path=str(tmp_path / "dpo"), base_model=TEST_MODEL, batch_size=4,
                       max_steps=2, infra=InfraConfig(storage_root=str(mount / "store"),
                                                      num_threads=1, mixed_precision="no"))
    with pytest.raises(StoreError, match=r"caching the reference log-probs in .*/store/cache/"
                                         r"reference_logprobs/ref-.*\.pt failed: \[Errno 28\] "
                                         r"No space left on device. Nothing was trained yet"):
        dpo_main(config)
    assert checkpoint_rows(tmp_path / "dpo") == []
