"""Sampler snapshots: base/delta chains, delta encodings, verification, type inference, TTL."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from transformers import AutoModelForCausalLM

from training.sdk import AdamParams, Datum, ModelInput, ServiceClient, StoreError
from training.sdk.snapshots import (
    DELTA_DATA_FILE,
    DELTA_ENCODINGS,
    LEGACY_DELTA_FORMAT,
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


def _client(store_root: str, sampler_dtype: str = "bfloat16", delta_encoding: str = "xor"):
    service = ServiceClient(store_root, mixed_precision="no", device="cpu",
                            sampler_dtype=sampler_dtype, delta_encoding=delta_encoding)
    return service.create_training_client(TEST_MODEL)


def test_snapshot_identities() -> None:
    assert parse_snapshot_identity("sampler://job1/step-1-abcd1234") == ("job1", "step-1-abcd1234")
    assert parse_snapshot_identity("job1:s") == ("job1", "s")
    assert parse_snapshot_identity("s", default_job_id="job2") == ("job2", "s")
    for bad in ("s", "sampler://job1/", "gs://bucket/x", "sampler://job/a/b"):
        with pytest.raises(ValueError, match="snapshot identity"):
            parse_snapshot_identity(bad)


@pytest.mark.parametrize(("sampler_dtype", "delta_encoding"),
                         [("bfloat16", "xor"), ("float32", "xor"), ("bfloat16", "ulp")])
def test_base_delta_delta_chain_reconstructs_bitwise(store_root, tiny_model_dir,
                                                     sampler_dtype, delta_encoding) -> None:
    client = _client(store_root, sampler_dtype, delta_encoding)
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
        manifest = read_delta_manifest(entry)
        assert manifest.reference == previous.path
        assert {e["encoding"] for e in manifest.tensors.values()} <= \
            {"unchanged", *DELTA_ENCODINGS[delta_encoding]}
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


@pytest.mark.parametrize("encoding", ["xor-symbols", "xor", "ternary", "dense"])
def test_encode_apply_round_trip_for_mixed_dtypes(tmp_path, encoding) -> None:
    generator = torch.Generator().manual_seed(0)
    reference = {"a": torch.randn(33, 7, generator=generator).to(torch.bfloat16),
                 "b": torch.randn(5, generator=generator),
                 "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
                 "d": torch.tensor([True, False, True]),
                 "e": torch.arange(-4, 5, dtype=torch.int8),
                 "f": torch.randn(3, generator=generator, dtype=torch.float64)}
    new = {"a": reference["a"] + 0.01, "b": reference["b"] * 1.0001, "c": reference["c"] + 1,
           "d": ~reference["d"], "e": reference["e"] * 3, "f": reference["f"] + 1e-12}
    stats = encode_delta(new, reference, str(tmp_path), reference_identity="sampler://j/ref",
                         encodings=[encoding])
    assert stats.compressed_bytes == (tmp_path / DELTA_DATA_FILE).stat().st_size
    assert stats.raw_bytes == 33 * 7 * 2 + 5 * 4 + 6 * 8 + 3 + 9 + 3 * 8
    assert stats.encodings == {encoding: 6}
    rebuilt = apply_delta(reference, str(tmp_path), reference_identity="sampler://j/ref")
    for name, tensor in new.items():
        assert rebuilt[name].dtype == tensor.dtype and torch.equal(rebuilt[name], tensor)
    manifest = read_delta_manifest(str(tmp_path))
    assert {e["encoding"] for e in manifest.tensors.values()} == {encoding}
    with pytest.raises(ValueError, match="encodings=.*expected some of"):
        encode_delta(new, reference, str(tmp_path), reference_identity="x", encodings=["zip"])


def _ulp_moves(reference: torch.Tensor, moves: torch.Tensor) -> torch.Tensor:
    """``reference`` moved by ``moves`` ulps (bf16 bits as int16: +1 is the next float up)."""
    return (reference.view(torch.int16) + moves.to(torch.int16)).view(torch.bfloat16)


def test_ternary_escapes_unchanged_tensors_and_the_smallest_encoding(tmp_path) -> None:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(4097, generator=generator).abs().add(0.5).to(torch.bfloat16)
    small = torch.randint(-1, 2, (4097,), generator=generator)  # 0 / +-1 ulp: no escapes
    escapes = small.clone()
    escapes[::7] = torch.randint(-300, 300, (586,), generator=generator)  # 1 in 7 escapes
    escapes[-1] = 1000  # an escape in the last, partly filled packed byte
    far = small.clone()
    far[[300, 2290, 4290 - 200]] = -5  # escapes 300, 1990 and 1800 apart: fillers between
    reference = {"sparse": base, "escapes": base.clone(), "same": base.clone(),
                 "noise": base.clone(), "far": base.clone()}
    new = {"sparse": _ulp_moves(base, small), "escapes": _ulp_moves(base, escapes),
           "same": base.clone(),  # equal bytes, another tensor object
           "noise": torch.randn(4097, generator=generator).to(torch.bfloat16),
           "far": _ulp_moves(base, far)}
    stats = encode_delta(new, reference, str(tmp_path), reference_identity="sampler://j/ref",
                         encodings=DELTA_ENCODINGS["ulp"])
    tensors = read_delta_manifest(str(tmp_path)).tensors
    assert tensors["sparse"]["encoding"] == "ternary" and tensors["sparse"]["escapes"] == 0
    assert tensors["escapes"]["encoding"] == "ternary"
    assert tensors["escapes"]["escapes"] == int(((escapes < -1) | (escapes > 1)).sum())
    assert tensors["same"]["encoding"] == "unchanged" and tensors["same"]["lengths"] == []
    assert tensors["noise"]["encoding"] == "dense"  # every element moves far: no 2-bit symbols
    # Gaps of one byte: a filler every 255 elements where escapes are further apart.
    assert tensors["far"]["escapes"] == 3 + (301 - 1) // 255 + (1990 - 1) // 255 + \
        (1800 - 1) // 255
    assert stats.encodings == {"ternary": 3, "unchanged": 1, "dense": 1}
    # Ternary tensors share their frames; ~1.6 bits of symbols per element where 2 in 3 move.
    stream = read_delta_manifest(str(tmp_path)).streams["ternary-2"]
    assert stream["tensors"] == ["sparse", "escapes", "far"]
    assert tensors["sparse"]["lengths"] == [] and len(stream["lengths"]) == 3
    assert stream["lengths"][0] < 3 * 4097 * 2 / 8
    rebuilt = apply_delta(reference, str(tmp_path))
    for name, tensor in new.items():
        assert torch.equal(rebuilt[name].view(torch.int16), tensor.view(torch.int16)), name
    assert rebuilt["same"] is reference["same"]  # checked, not copied


def _xor_escapes(new: torch.Tensor, reference: torch.Tensor) -> int:
    """Escapes and fillers of bf16 ``new`` against ``reference`` in ``xor-symbols``: the
    elements whose XOR is no symbol, plus a filler every 255 elements between them."""
    xor = (new.view(torch.int16) ^ reference.view(torch.int16)).to(torch.int64) & 0xFFFF
    symbols = torch.tensor([0, 0x1, 0x3, 0x7, 0xF, 0x1F, 0x3F, 0x7F, 0x2, 0x6, 0xE, 0x1E, 0x5,
                            0xD, 0x4, 0xC])
    escaped = np.flatnonzero((~torch.isin(xor, symbols)).numpy())
    gaps = np.diff(escaped, prepend=-1)
    return escaped.size + int(((gaps - 1) // 255).sum())


def test_xor_symbols_escapes_unchanged_tensors_and_the_smallest_encoding(tmp_path) -> None:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(4097, generator=generator).abs().add(0.5).to(torch.bfloat16)
    one_ulp = torch.randint(-1, 2, (4097,), generator=generator)
    reference = {"small": base, "same": base.clone(), "noise": base.clone()}
    new = {"small": _ulp_moves(base, one_ulp), "same": base.clone(),
           "noise": torch.randn(4097, generator=generator).to(torch.bfloat16)}
    stats = encode_delta(new, reference, str(tmp_path), reference_identity="sampler://j/ref")
    tensors = read_delta_manifest(str(tmp_path)).tensors
    # A 1-ulp move flips a run of low bits: a symbol, but for carries into the exponent.
    assert tensors["small"]["encoding"] == "xor-symbols"
    assert 0 < tensors["small"]["escapes"] == _xor_escapes(new["small"], base) < 40
    assert tensors["same"]["encoding"] == "unchanged"
    assert tensors["noise"]["encoding"] == "xor"  # most XORs are no symbol: byte planes
    assert stats.encodings == {"xor-symbols": 1, "unchanged": 1, "xor": 1}
    assert read_delta_manifest(str(tmp_path)).streams["xor-symbols-2"]["tensors"] == ["small"]
    rebuilt = apply_delta(reference, str(tmp_path))
    for name, tensor in new.items():
        assert torch.equal(rebuilt[name].view(torch.int16), tensor.view(torch.int16)), name
    # Escapes 300, 1990 and 1800 apart: fillers between them keep every gap in one byte.
    far = torch.zeros(4097, dtype=torch.int64)
    far[[299, 2289, 4089]] = 40
    reference, new = {"far": base, "small": base}, {"far": _ulp_moves(base, far),
                                                    "small": new["small"]}
    encode_delta(new, reference, str(tmp_path), reference_identity="sampler://j/ref",
                 encodings=["xor-symbols"])
    tensors = read_delta_manifest(str(tmp_path)).tensors
    assert tensors["far"]["escapes"] == _xor_escapes(new["far"], base) == \
        3 + (300 - 1) // 255 + (1990 - 1) // 255 + (1800 - 1) // 255
    rebuilt = apply_delta(reference, str(tmp_path))
    for name, tensor in new.items():
        assert torch.equal(rebuilt[name].view(torch.int16), tensor.view(torch.int16)), name


@pytest.mark.parametrize("encoding", ["ternary", "xor-symbols"])
def test_corrupt_symbol_payloads_are_refused(tmp_path, encoding) -> None:
    generator = torch.Generator().manual_seed(2)
    reference = {"w": torch.randn(64, 33, generator=generator).to(torch.bfloat16)}
    moves = torch.randint(-1, 2, (64, 33), generator=generator)
    moves[::5, ::3] = 40  # escapes
    new = {"w": _ulp_moves(reference["w"], moves)}
    encode_delta(new, reference, str(tmp_path), reference_identity="sampler://j/ref",
                 encodings=[encoding])
    manifest_path = tmp_path / DELTA_MANIFEST_FILE
    data = tmp_path / DELTA_DATA_FILE
    good_manifest, good_data = manifest_path.read_text(), data.read_bytes()
    escapes = json.loads(good_manifest)["tensors"]["w"]["escapes"]
    assert escapes >= 13 * 11  # xor-symbols: also the 1-ulp moves with long carries
    key = f"{encoding}-2"
    stream = json.loads(good_manifest)["streams"][key]
    symbols_length, gaps_length, values_length = stream["lengths"]

    def refused(match: str) -> None:
        with pytest.raises(SnapshotCorruptError, match=match):
            apply_delta(reference, str(tmp_path))
        manifest_path.write_text(good_manifest)
        data.write_bytes(good_data)

    def replace_frame(index: int, edit) -> None:
        """Decompress frame ``index``, edit its bytes, write it back (manifest updated)."""
        lengths = stream["lengths"]
        start = stream["offset"] + sum(lengths[:index])
        body = np.frombuffer(zstandard.ZstdDecompressor().decompress(
            good_data[start:start + lengths[index]]), np.uint8).copy()
        edit(body)
        frame = zstandard.ZstdCompressor(level=1).compress(body.tobytes())
        payload = json.loads(good_manifest)
        payload["streams"][key]["lengths"][index] = len(frame)
        manifest_path.write_text(json.dumps(payload))
        data.write_bytes(good_data[:start] + frame + good_data[start + lengths[index]:])

    # Frames that decode, but to other weights: only the checksum can tell.
    replace_frame(0, lambda symbols: symbols.__setitem__(0, symbols[0] ^ 0b01))
    refused("fail the manifest's checksum")
    replace_frame(2, lambda values: values.__setitem__(3, values[3] + 1))
    refused("fail the manifest's checksum")
    replace_frame(1, lambda gaps: gaps.__setitem__(2, gaps[2] + 1))  # escapes one place later
    refused("fail the manifest's checksum")
    # Gaps that put an escape past the end, or before the start.
    replace_frame(1, lambda gaps: gaps.__setitem__(-1, 255))
    refused(r"has an escape outside its 2112 elements")
    replace_frame(1, lambda gaps: gaps.__setitem__(0, 0))
    refused(r"has an escape outside its 2112 elements")
    # A flipped byte inside a compressed frame.
    blob = bytearray(good_data)
    blob[symbols_length + gaps_length + values_length // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    refused("does not decompress|decompresses to|fail the manifest's checksum")
    # The manifest miscounts the escapes, names an unknown encoding, drops a frame of the
    # stream or lists other tensors in it.
    for field, value, match in (("escapes", escapes + 1, f"a frame of the {key} stream "
                                 f"decompresses to {escapes} bytes, expected {escapes + 1}"),
                                ("escapes", -1, "negative escape count"),
                                ("encoding", "quaternary", "newer version of homefire")):
        payload = json.loads(good_manifest)
        payload["tensors"]["w"][field] = value
        manifest_path.write_text(json.dumps(payload))
        refused(match)
    for field, value, match in (("lengths", [symbols_length, gaps_length], f"the {key} "
                                 "stream has 2 frames, expected 3"),
                                ("tensors", ["v"], r"lists tensors \['v'\], the manifest")):
        payload = json.loads(good_manifest)
        payload["streams"][key][field] = value
        manifest_path.write_text(json.dumps(payload))
        refused(match)
    # Frames past the end of delta.bin.
    data.write_bytes(good_data[:-1])
    refused("run past the end of the file")
    assert torch.equal(apply_delta(reference, str(tmp_path))["w"].view(torch.int16),
                       new["w"].view(torch.int16))


def test_format_1_xor_deltas_are_still_read(tmp_path) -> None:
    """A delta written before per-tensor encodings: XOR (byte planes or not), SHA-256."""
    generator = torch.Generator().manual_seed(3)
    reference = {"w": torch.randn(8, 5, generator=generator).to(torch.bfloat16),
                 "n": torch.arange(4, dtype=torch.int64)}
    new = {"w": reference["w"] * 1.01, "n": reference["n"] + 7}
    for byte_planes in (True, False):
        offset, tensors, frames = 0, {}, []
        for name, tensor in new.items():
            raw = tensor.contiguous().view(torch.uint8).numpy()
            xor = np.bitwise_xor(raw, reference[name].contiguous().view(torch.uint8).numpy())
            if byte_planes:
                xor = xor.reshape(-1, tensor.element_size()).T.copy()
            frame = zstandard.ZstdCompressor(level=1).compress(xor.tobytes())
            frames.append(frame)
            tensors[name] = {"dtype": str(tensor.dtype).removeprefix("torch."),
                             "shape": list(tensor.shape), "offset": offset,
                             "length": len(frame), "sha256": hashlib.sha256(raw).hexdigest()}
            offset += len(frame)
        (tmp_path / DELTA_DATA_FILE).write_bytes(b"".join(frames))
        (tmp_path / DELTA_MANIFEST_FILE).write_text(json.dumps(
            {"format": LEGACY_DELTA_FORMAT, "reference": "sampler://j/ref", "tensors": tensors,
             "byte_planes": byte_planes, "compression": "zstd", "level": 1, "extra": {}}))
        rebuilt = apply_delta(reference, str(tmp_path), reference_identity="sampler://j/ref")
        assert all(torch.equal(rebuilt[k], v) for k, v in new.items())
        with pytest.raises(SnapshotCorruptError, match=r"fail the manifest's checksum \(sha256\)"):
            apply_delta({"w": reference["w"] + 1, "n": reference["n"]}, str(tmp_path))
    payload = json.loads((tmp_path / DELTA_MANIFEST_FILE).read_text())
    payload["format"] = "homefire-xor-delta/9"
    (tmp_path / DELTA_MANIFEST_FILE).write_text(json.dumps(payload))
    with pytest.raises(SnapshotCorruptError, match="written by another version of homefire"):
        apply_delta(reference, str(tmp_path))


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
    # Other weights of the right shape: the delta "works" but the checksum catches it.
    with pytest.raises(SnapshotCorruptError, match="fail the manifest's checksum"):
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
    assert payload["format"] == "homefire-weights/2" and payload["checksum"] == "xxh3_128"
    entry = payload["tensors"]["model.norm.weight"]
    entry["xxh3_128"] = "0" * 32
    manifest.write_text(json.dumps(payload))
    with pytest.raises(SnapshotCorruptError, match=r"'model.norm.weight' fails its checksum "
                                                   r"\(xxh3_128\)"):
        load_snapshot_weights(client.store, saved.path)
    # Manifests of the previous format hold SHA-256, still verified.
    norm = AutoModelForCausalLM.from_pretrained(manifest.parent, dtype="auto").state_dict()[
        "model.norm.weight"]
    del entry["xxh3_128"]
    entry["sha256"] = hashlib.sha256(norm.contiguous().view(torch.uint8).numpy()).hexdigest()
    manifest.write_text(json.dumps(payload))
    assert torch.equal(load_snapshot_weights(client.store, saved.path)["model.norm.weight"], norm)
    entry["sha256"] = "0" * 64
    manifest.write_text(json.dumps(payload))
    with pytest.raises(SnapshotCorruptError, match=r"fails its checksum \(sha256\)"):
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


def test_an_unknown_delta_encoding_is_refused_up_front(store_root) -> None:
    with pytest.raises(ValueError, match=r"delta_encoding='zip': expected one of \['ulp', 'xor'\]"):
        ServiceClient(store_root, device="cpu", delta_encoding="zip")
