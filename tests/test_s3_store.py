"""Stores on fsspec URLs: s3:// against a local S3-compatible server (moto) on loopback, and
file://."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.recipes.sft_loop import Config, main
from training.sdk.models import load_causal_lm
from training.sdk.snapshots import load_snapshot_weights
from training.sdk.store import CheckpointStore
from training.utils import InfraConfig

from .conftest import TEST_MODEL

moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (dev extra)")
pytest.importorskip("s3fs", reason="needs s3fs (dev extra)")

BUCKET = "homefire-test"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (random port) and the AWS settings that point to it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield settings["AWS_ENDPOINT_URL"]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _config(tmp_path: Path, root: str, log: str, **overrides) -> Config:
    chats = tmp_path / "chats.jsonl"
    if not chats.exists():
        chats.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"Spell {w}."},
            {"role": "assistant", "content": " ".join(w)}]}) + "\n"
            for w in ("cat", "house", "river", "stone", "light", "cloud", "apple", "green")))
    fields = dict(log_path=str(tmp_path / log), base_model=TEST_MODEL, dataset=str(chats),
                  batch_size=4, epochs=3, learning_rate=1e-3, dcp_save_interval=2,
                  infra=InfraConfig(storage_root=root, num_threads=1, mixed_precision="no"))
    fields.update(overrides)
    return Config(**fields)


def _rows(log_path: str) -> list[dict]:
    return [json.loads(line) for line in (Path(log_path) / "checkpoints.jsonl").read_text()
            .splitlines()]


def test_sft_resume_and_promotion_on_s3(tmp_path, s3_endpoint, tiny_model_dir):
    store = _resume_and_promote(tmp_path, f"s3://{BUCKET}/{tmp_path.name}")
    assert not store.is_local


def test_sft_resume_and_promotion_on_a_file_url(tmp_path, tiny_model_dir):
    store = _resume_and_promote(tmp_path, f"file://{tmp_path}/store")
    assert store.is_local and (tmp_path / "store" / "jobs").is_dir()


def _resume_and_promote(tmp_path: Path, root: str) -> CheckpointStore:
    """An SFT run rolled back to its first checkpoint and rerun ends bitwise equal to an
    uninterrupted one; its promoted model lands in the store and loads from there."""
    reference = main(_config(tmp_path, root, "reference"))

    interrupted = _config(tmp_path, root, "run")
    main(interrupted)
    rows = _rows(interrupted.log_path)
    assert rows[0]["state_path"].startswith("cross_job://")
    # Roll back to the first checkpoint, as if the run had died right after it, and rerun.
    (Path(interrupted.log_path) / "checkpoints.jsonl").write_text(json.dumps(rows[0]) + "\n")
    resumed = main(_config(tmp_path, root, "run", output_model_id="s3-sft-model"))

    store = CheckpointStore(root)
    assert store.list_states(rows[0]["source_job_id"])
    ref_final, got_final = _rows(reference.log_path)[-1], _rows(resumed.log_path)[-1]
    expected = load_snapshot_weights(store, f"sampler://{ref_final['source_job_id']}/"
                                            f"{ref_final['sampler_path']}")
    got = load_snapshot_weights(store, f"sampler://{got_final['source_job_id']}/"
                                       f"{got_final['sampler_path']}")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    # The promoted model lives in the bucket and loads as a base_model through the store.
    promoted = resumed.promoted_model
    assert promoted["name"] == "accounts/local/models/s3-sft-model"
    assert store.fs.exists(f"{store.model_dir('local', 's3-sft-model')}/model.safetensors")
    model = load_causal_lm(promoted["name"], store)
    for name, tensor in got.items():
        assert torch.equal(model.state_dict()[name].to(tensor.dtype), tensor), name
    return store


def test_two_ranks_save_sharded_states_to_s3_and_resume_on_one(tmp_path, s3_endpoint,
                                                                tiny_model_dir):
    """Each rank stages and uploads its own shards; rank 0 commits after all uploads. A run
    killed after step 3 on 2 ranks resumes on 1 process from the step-2 state in S3."""
    root = f"s3://{BUCKET}/{tmp_path.name}"
    _config(tmp_path, root, "unused")  # writes chats.jsonl
    args = [f"log_path={tmp_path / 'run'}", f"base_model={TEST_MODEL}",
            f"dataset={tmp_path / 'chats.jsonl'}", "batch_size=4", "max_steps=4",
            "dcp_save_interval=2", "learning_rate=1e-3", f"infra.storage_root={root}",
            "infra.num_threads=1", "infra.mixed_precision=no"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMEFIRE_FAULT")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "recipes.sft_loop"]
    killed = subprocess.run([*torchrun, *args], cwd=REPO, capture_output=True, text=True,
                            env={**env, "HOMEFIRE_FAULT_POINT": "step:3"}, timeout=300)
    assert killed.returncode != 0
    row = _rows(str(tmp_path / "run"))[-1]
    assert row["step"] == 2
    store = CheckpointStore(root)
    state_dir = store.state_dir(row["source_job_id"], row["name"])
    assert sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(state_dir)) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "checksums.rank0.json",
        "checksums.rank1.json", "meta.json"]  # each rank uploaded its shard and its checksums
    rerun = subprocess.run([sys.executable, "-m", "recipes.sft_loop", *args], cwd=REPO,
                           capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from step-2" in rerun.stdout
    assert _rows(str(tmp_path / "run"))[-1]["step"] == 4
