"""Sampler snapshots: base/delta chains, XOR delta encoding, verification, type inference, TTL."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from training.sdk import AdamParams, Datum, ModelInput, ServiceClient, StoreError
from training.sdk.snapshots import (
    DELTA_DATA_FILE,
    SnapshotCorruptError,
    SnapshotMismatchError,
    apply_delta,
    encode_delta,
    load_snapshot_weights,
    parse_snapshot_identity,
    read_delta_manifest,
)
from training.sdk.store import DELTA_MANIFEST_FILE, CheckpointNotFoundError

from .conftest import TEST_MODEL


def _step(client, lr: float) -> None:
    tokens = list(range(3, 19))
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:])})
    client.forward_backward([datum]).result()
    client.optim_step(AdamParams(learning_rate=lr)).result()


def _trainer_weights(client) -> dict[str, torch.Tensor]:
    # copy=True: for fp32 snapshots .to() would alias the live parameters.
    return {k: v.detach().to(client.sampler_dtype, copy=True)
            for k, v in client.model.state_dict().items()}


def _client(store_root: str, sampler_dtype: str = "bfloat16"):
    service = ServiceClient(store_root, mixed_precision="no", device="cpu",
                            sampler_dtype=sampler_dtype)
    return service.create_training_client(TEST_MODEL)


def test_snapshot_identities() -> None:
    assert parse_snapshot_identity("sampler://job1/step-1-abcd1234") == ("job1", "step-1-abcd1234")
    assert parse_snapshot_identity("job1:s") == ("job1", "s")
    assert parse_snapshot_identity("s", default_job_id="job2") == ("job2", "s")
    for bad in ("s", "sampler://job1/", "gs://bucket/x", "sampler://job/a/b"):
        with pytest.raises(ValueError, match="snapshot identity"):
            parse_snapshot_identity(bad)


@pytest.mark.parametrize("sampler_dtype", ["bfloat16", "float32"])
def test_base_delta_delta_chain_reconstructs_bitwise(store_root, tiny_model_dir,
                                                     sampler_dtype) -> None:
    client = _client(store_root, sampler_dtype)
    saved, expected = [], []
    for i in range(3):  # default types: base, then deltas
        if i:
            _step(client, 1e-3)
        saved.append(client.save_weights_for_sampler(f"step-{i}").result())
        expected.append(_trainer_weights(client))
    types = [client.store.get_sampler(client.job_id, s.snapshot_name).snapshot_type
             for s in saved]
    assert types == ["INFERENCE_BASE", "INFERENCE_ARC_V2", "INFERENCE_ARC_V2"]
    for previous, delta in zip(saved, saved[1:], strict=False):
        entry = client.store.sampler_dir(client.job_id, delta.snapshot_name)
        assert read_delta_manifest(entry).reference == previous.path
        assert not (Path(entry) / "model.safetensors").exists()
    for snapshot, weights in zip(saved, expected, strict=True):
        rebuilt = load_snapshot_weights(client.store, snapshot.path)
        assert rebuilt.keys() == weights.keys() - {"lm_head.weight"}  # tied to the embedding
        for name, tensor in rebuilt.items():
            assert tensor.dtype == getattr(torch, sampler_dtype)
            assert torch.equal(tensor, weights[name]), (snapshot.path, name)
    # A bare snapshot name resolves in the client's own job.
    bare = load_snapshot_weights(client.store, saved[2].snapshot_name,
                                 default_job_id=client.job_id)
    assert all(torch.equal(bare[k], expected[2][k]) for k in bare)
    # The base stays a plain Hugging Face model, in the snapshot dtype.
    base_dir = client.store.sampler_dir(client.job_id, saved[0].snapshot_name)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    assert model.dtype == getattr(torch, sampler_dtype)
    assert torch.equal(model.state_dict()["model.norm.weight"], expected[0]["model.norm.weight"])


def test_bf16_delta_is_small_at_a_small_learning_rate(store_root, tiny_model_dir) -> None:
    client = _client(store_root)
    client.save_weights_for_sampler_ext("base")
    _step(client, 1e-5)
    small = client.save_weights_for_sampler_ext("lr-1e-5")
    _step(client, 1e-2)
    large = client.save_weights_for_sampler_ext("lr-1e-2")
    extra = {r.snapshot_name: client.store.get_sampler(client.job_id, r.snapshot_name).extra
             for r in (small, large)}
    small_ratio = extra[small.snapshot_name]["delta_bytes"] / extra[small.snapshot_name]["raw_bytes"]
    large_ratio = extra[large.snapshot_name]["delta_bytes"] / extra[large.snapshot_name]["raw_bytes"]
    assert small_ratio < 0.3 < large_ratio
    delta_file = Path(client.store.sampler_dir(client.job_id, small.snapshot_name), DELTA_DATA_FILE)
    assert delta_file.stat().st_size == extra[small.snapshot_name]["delta_bytes"]


@pytest.mark.parametrize("byte_planes", [True, False])
def test_encode_apply_round_trip_for_mixed_dtypes(tmp_path, byte_planes) -> None:
    generator = torch.Generator().manual_seed(0)
    reference = {"a": torch.randn(33, 7, generator=generator).to(torch.bfloat16),
                 "b": torch.randn(5, generator=generator),
                 "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    new = {"a": reference["a"] + 0.01, "b": reference["b"] * 1.0001, "c": reference["c"] + 1}
    stats = encode_delta(new, reference, str(tmp_path), reference_identity="sampler://j/ref",
                         byte_planes=byte_planes)
    assert stats.compressed_bytes == (tmp_path / DELTA_DATA_FILE).stat().st_size
    assert stats.raw_bytes == 33 * 7 * 2 + 5 * 4 + 6 * 8
    rebuilt = apply_delta(reference, str(tmp_path), reference_identity="sampler://j/ref")
    for name, tensor in new.items():
        assert rebuilt[name].dtype == tensor.dtype and torch.equal(rebuilt[name], tensor)
    assert read_delta_manifest(str(tmp_path)).byte_planes is byte_planes


def test_mismatched_or_corrupt_deltas_are_refused(tmp_path) -> None:
    reference = {"w": torch.randn(64, 8).to(torch.bfloat16), "b": torch.randn(8)}
    new = {"w": reference["w"] * 2, "b": reference["b"] + 1}
    encode_delta(new, reference, str(tmp_path), reference_identity="sampler://j/ref")
    with pytest.raises(SnapshotMismatchError, match="applies to sampler://j/ref, not to "
                                                    "sampler://j/other"):
        apply_delta(reference, str(tmp_path), reference_identity="sampler://j/other")
    with pytest.raises(SnapshotMismatchError, match="tensor names differ"):
        apply_delta({"w": reference["w"]}, str(tmp_path))
    with pytest.raises(SnapshotMismatchError, match=r"'w' is bfloat16\[64, 8\], the reference "
                                                    r"has float32\[64, 8\]"):
        apply_delta({"w": reference["w"].float(), "b": reference["b"]}, str(tmp_path))
    # Other weights of the right shape: the XOR "works" but the checksum catches it.
    with pytest.raises(SnapshotCorruptError, match="fail the manifest's SHA-256"):
        apply_delta({"w": reference["w"] + 1, "b": reference["b"]}, str(tmp_path))

    data = tmp_path / DELTA_DATA_FILE
    blob = bytearray(data.read_bytes())
    data.write_bytes(bytes(blob[: len(blob) // 2]))  # truncated
    with pytest.raises(SnapshotCorruptError, match="the delta is corrupt"):
        apply_delta(reference, str(tmp_path))
    manifest_path = tmp_path / DELTA_MANIFEST_FILE
    manifest_path.write_text("{not json")
    with pytest.raises(SnapshotCorruptError, match="is corrupt"):
        apply_delta(reference, str(tmp_path))


def test_corrupt_base_snapshot_fails_its_checksum(store_root, tiny_model_dir) -> None:
    client = _client(store_root)
    saved = client.save_weights_for_sampler_ext("base")
    manifest = Path(client.store.sampler_dir(client.job_id, saved.snapshot_name),
                    "weights_manifest.json")
    payload = json.loads(manifest.read_text())
    payload["tensors"]["model.norm.weight"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(payload))
    with pytest.raises(SnapshotCorruptError, match="'model.norm.weight' fails its SHA-256"):
        load_snapshot_weights(client.store, saved.path)


def test_delta_needs_a_base_of_this_session(store_root, tiny_model_dir) -> None:
    client = _client(store_root)
    with pytest.raises(ValueError, match="has no base snapshot in this session"):
        client.save_weights_for_sampler_ext("d", checkpoint_type="delta")
    with pytest.raises(ValueError, match="checkpoint_type='full'"):
        client.save_weights_for_sampler_ext("d", checkpoint_type="full")
    client.save_weights_for_sampler_ext("b")
    head = client.sampler_chain_head
    assert head == f"sampler://{client.job_id}/b-{client.session_id}"
    client.reset_sampler_chain()
    assert client.sampler_chain_head is None
    again = client.save_weights_for_sampler_ext("b2")  # after a reset the default is a base
    assert client.store.get_sampler(client.job_id, again.snapshot_name).snapshot_type == \
        "INFERENCE_BASE"


def test_store_infers_snapshot_type_from_contents(store_root, tiny_model_dir) -> None:
    client = _client(store_root)
    base = client.save_weights_for_sampler_ext("b")
    delta = client.save_weights_for_sampler_ext("d")
    store = client.store
    assert store.infer_snapshot_type(store.sampler_dir(client.job_id, base.snapshot_name)) == \
        "INFERENCE_BASE"
    assert store.infer_snapshot_type(store.sampler_dir(client.job_id, delta.snapshot_name)) == \
        "INFERENCE_ARC_V2"
    adapter = Path(store_root, "adapter")
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert store.infer_snapshot_type(str(adapter)) == "INFERENCE_LORA"
    (adapter / "adapter_config.json").unlink()
    (adapter / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match=r"is not a sampler snapshot.*files: notes.txt"):
        store.infer_snapshot_type(str(adapter))


def test_ttl_snapshots_expire_and_are_cleaned_up(store_root, tiny_model_dir,
                                                 monkeypatch) -> None:
    client = _client(store_root)
    kept = client.save_weights_for_sampler_ext("kept")
    temp = client.save_weights_for_sampler_ext("temp", ttl_seconds=60)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 120)
    with pytest.raises(CheckpointNotFoundError, match="it expired"):
        client.store.get_sampler(client.job_id, temp.snapshot_name)
    assert client.store.cleanup_expired(client.job_id) == [f"samplers/{temp.snapshot_name}"]
    assert not Path(client.store.sampler_dir(client.job_id, temp.snapshot_name)).exists()
    assert client.store.get_sampler(client.job_id, kept.snapshot_name).expires_at is None
