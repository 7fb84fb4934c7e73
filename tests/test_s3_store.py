"""The checkpoint store on s3://, against a local S3-compatible server (moto) on loopback."""

from __future__ import annotations

import json
import os
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
    root = f"s3://{BUCKET}/{tmp_path.name}"
    reference = main(_config(tmp_path, root, "reference"))

    interrupted = _config(tmp_path, root, "run")
    main(interrupted)
    rows = _rows(interrupted.log_path)
    assert rows[0]["state_path"].startswith("cross_job://")
    # Roll back to the first checkpoint, as if the run had died right after it, and rerun.
    (Path(interrupted.log_path) / "checkpoints.jsonl").write_text(json.dumps(rows[0]) + "\n")
    resumed = main(_config(tmp_path, root, "run", output_model_id="s3-sft-model"))

    store = CheckpointStore(root)
    assert not store.is_local and store.list_states(rows[0]["source_job_id"])
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
