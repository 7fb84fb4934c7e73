"""Sampler snapshots on disk: full (``base``) weights, XOR deltas, manifests and checksums.

A sampler snapshot is a directory in the store (``{root}/jobs/{job}/samplers/{snapshot_name}/``)
in one of two shapes:

* **base** (``INFERENCE_BASE``): a Hugging Face directory (``config.json``,
  ``model.safetensors``, tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` loads,
  plus ``weights_manifest.json`` with the dtype, shape and SHA-256 of every tensor.
* **delta** (``INFERENCE_ARC_V2``): ``delta.bin`` and ``delta_manifest.json``. For every tensor,
  the raw bytes of the new weights XOR the raw bytes of the *reference* snapshot's tensor (the
  previous snapshot of the chain), optionally split into byte planes, compressed with zstd
  (one frame per tensor, concatenated). The manifest names the reference snapshot and holds the
  dtype, shape, frame offset/length and the SHA-256 of the *reconstructed* tensor.

XOR of raw bytes is exact for any dtype, so ``reference XOR delta`` gives back the new weights
bit for bit; the checksums prove it on every reconstruction. Weights that one optimizer step
barely moves share their sign, exponent and top mantissa bits with the reference, so the XOR is
mostly zero bytes and compresses well (see ``benchmarks/sampler_snapshots.py``).

Snapshot identities are ``sampler://<job_id>/<snapshot_name>`` (what ``SaveSamplerResult.path``
holds); :func:`parse_snapshot_identity` also accepts ``<job_id>:<snapshot_name>`` and, given a
default job, a bare snapshot name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zstandard
from safetensors.torch import load_file

from training.sdk.store import (
    DELTA_MANIFEST_FILE,
    WEIGHTS_MANIFEST_FILE,
    CheckpointStore,
    StoreError,
)

__all__ = [
    "DELTA_DATA_FILE", "DELTA_FORMAT", "SAMPLER_SCHEME", "DeltaManifest", "DeltaStats",
    "SnapshotCorruptError", "SnapshotError", "SnapshotMismatchError", "apply_delta",
    "encode_delta", "load_snapshot_weights", "make_snapshot_identity", "parse_snapshot_identity",
    "read_delta_manifest", "read_weights_manifest", "tensor_checksum", "verify_weights",
    "write_weights_manifest",
]

SAMPLER_SCHEME = "sampler://"
DELTA_DATA_FILE = "delta.bin"
DELTA_FORMAT = "homefire-xor-delta/1"
ZSTD_LEVEL = 1
"""zstd level of delta frames: level 3 compresses XOR deltas no better than 1 and is slower."""

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


class SnapshotError(StoreError):
    """Base class of sampler snapshot errors."""


class SnapshotMismatchError(SnapshotError, ValueError):
    """A delta does not fit the weights it is applied to (reference, keys, dtype or shape)."""


class SnapshotCorruptError(SnapshotError):
    """A snapshot's files do not match its manifest (truncated, altered or wrong checksum)."""


# ------------------------------------------------------------------------------- identities
def make_snapshot_identity(job_id: str, snapshot_name: str) -> str:
    """``sampler://<job_id>/<snapshot_name>``: the public identity of a sampler snapshot."""
    return f"{SAMPLER_SCHEME}{job_id}/{snapshot_name}"


def parse_snapshot_identity(identity: str, default_job_id: str | None = None) -> tuple[str, str]:
    """``sampler://job/name``, ``job:name`` or (with ``default_job_id``) ``name`` -> (job, name)."""
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"snapshot identity {identity!r} is empty or not a string; pass "
                         f"SaveSamplerResult.path ('sampler://<job_id>/<snapshot_name>')")
    if identity.startswith(SAMPLER_SCHEME):
        job_id, _, name = identity[len(SAMPLER_SCHEME):].partition("/")
    elif ":" in identity and "://" not in identity:
        job_id, _, name = identity.partition(":")
    elif "://" not in identity and "/" not in identity and default_job_id is not None:
        job_id, name = default_job_id, identity
    else:
        raise ValueError(f"snapshot identity {identity!r} names no trainer job: pass "
                         f"SaveSamplerResult.path ('sampler://<job_id>/<snapshot_name>') or "
                         f"'<job_id>:<snapshot_name>'")
    if not job_id or not name or "/" in name:
        raise ValueError(f"snapshot identity {identity!r} is malformed: expected "
                         f"'sampler://<job_id>/<snapshot_name>'")
    return job_id, name


# ------------------------------------------------------------------------------- tensors
def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (a view where the tensor is contiguous on CPU)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy()


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's raw bytes in its own dtype."""
    return hashlib.sha256(_raw_bytes(tensor)).hexdigest()


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _tensor_from_bytes(data: np.ndarray, dtype_name: str, shape: list[int]) -> torch.Tensor:
    dtype = _DTYPES[dtype_name]
    tensor = torch.from_numpy(data.copy() if not data.flags.writeable else data)
    if dtype == torch.bool:
        return tensor.to(torch.bool).reshape(shape)
    return tensor.view(dtype).reshape(shape)


def _to_planes(data: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte ``k`` of every element together: sign/exponent bytes compress apart from mantissa."""
    planes = np.empty((itemsize, data.size // itemsize), dtype=np.uint8)
    elements = data.reshape(-1, itemsize)
    for k in range(itemsize):  # one strided copy per plane: ~6x faster than a transpose copy
        planes[k] = elements[:, k]
    return planes.reshape(-1)


def _from_planes(data: np.ndarray, itemsize: int) -> np.ndarray:
    out = np.empty(data.size, dtype=np.uint8)
    elements = out.reshape(-1, itemsize)
    planes = data.reshape(itemsize, -1)
    for k in range(itemsize):
        elements[:, k] = planes[k]
    return out


# ------------------------------------------------------------------------------- manifests
def write_weights_manifest(directory: str, weights: Mapping[str, torch.Tensor]) -> None:
    """Write ``weights_manifest.json``: dtype, shape and SHA-256 of each tensor of a base."""
    manifest = {"format": "homefire-weights/1",
                "tensors": {name: {"dtype": _dtype_name(t), "shape": list(t.shape),
                                   "sha256": tensor_checksum(t)}
                            for name, t in weights.items()}}
    _write_json(os.path.join(directory, WEIGHTS_MANIFEST_FILE), manifest)


def read_weights_manifest(directory: str) -> dict[str, dict[str, Any]] | None:
    """The per-tensor entries of a base snapshot's manifest, or None if it has none."""
    payload = _read_json(os.path.join(directory, WEIGHTS_MANIFEST_FILE), required=False)
    return None if payload is None else payload["tensors"]


def verify_weights(weights: Mapping[str, torch.Tensor], expected: Mapping[str, dict[str, Any]],
                   what: str) -> None:
    """Check keys, dtype, shape and SHA-256 of ``weights`` against manifest entries.

    Raises:
        SnapshotMismatchError: keys, dtype or shape differ.
        SnapshotCorruptError: a checksum differs.
    """
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:5]
        extra = sorted(set(weights) - set(expected))[:5]
        raise SnapshotMismatchError(f"{what}: tensor names differ from its manifest "
                                    f"(missing {missing}, unexpected {extra})")
    for name, entry in expected.items():
        tensor = weights[name]
        if _dtype_name(tensor) != entry["dtype"] or list(tensor.shape) != entry["shape"]:
            raise SnapshotMismatchError(
                f"{what}: tensor {name!r} is {_dtype_name(tensor)}{list(tensor.shape)}, its "
                f"manifest says {entry['dtype']}{entry['shape']}")
        if tensor_checksum(tensor) != entry["sha256"]:
            raise SnapshotCorruptError(f"{what}: tensor {name!r} fails its SHA-256 check; the "
                                       f"snapshot is corrupt: save a new one")


@dataclass
class DeltaManifest:
    """``delta_manifest.json``: what a delta applies to and what it must produce."""

    reference: str
    """Identity (``sampler://job/name``) of the snapshot whose weights the XOR is taken against."""
    tensors: dict[str, dict[str, Any]]
    """Per tensor: ``dtype``, ``shape``, ``offset`` and ``length`` (bytes of its zstd frame in
    ``delta.bin``) and ``sha256`` of the reconstructed tensor."""
    byte_planes: bool = True
    """Whether each tensor's XOR bytes were regrouped into byte planes before compression."""
    compression: str = "zstd"
    level: int = ZSTD_LEVEL
    format: str = DELTA_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeltaStats:
    """Sizes of one encoded delta, in bytes."""

    raw_bytes: int
    """Bytes of the new weights in their dtype (what a base snapshot's tensors take)."""
    compressed_bytes: int
    """Bytes of ``delta.bin``."""

    @property
    def ratio(self) -> float:
        """compressed / raw (0.1 = ten times smaller than the full weights)."""
        return self.compressed_bytes / max(self.raw_bytes, 1)


def read_delta_manifest(directory: str) -> DeltaManifest:
    payload = _read_json(os.path.join(directory, DELTA_MANIFEST_FILE), required=True)
    if payload.get("format") != DELTA_FORMAT:
        raise SnapshotCorruptError(f"{directory}: delta format {payload.get('format')!r} is not "
                                   f"{DELTA_FORMAT!r}; it was written by another version")
    return DeltaManifest(**payload)


# ------------------------------------------------------------------------------- deltas
def encode_delta(new: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                 directory: str, *, reference_identity: str, byte_planes: bool = True,
                 level: int = ZSTD_LEVEL) -> DeltaStats:
    """Write ``new XOR reference`` (zstd) and its manifest into ``directory``.

    Both mappings must have the same tensor names, dtypes and shapes (a delta never changes the
    architecture); ``reference_identity`` is recorded as the snapshot the delta applies to.

    Raises:
        SnapshotMismatchError: names, dtypes or shapes differ.
    """
    _check_compatible(new, reference, f"delta against {reference_identity}")
    compressor = zstandard.ZstdCompressor(level=level)
    tensors: dict[str, dict[str, Any]] = {}
    offset = raw_total = 0
    with open(os.path.join(directory, DELTA_DATA_FILE), "wb") as out:
        for name, tensor in new.items():
            raw = _raw_bytes(tensor)
            xor = np.bitwise_xor(raw, _raw_bytes(reference[name]))
            if byte_planes and tensor.element_size() > 1:
                xor = _to_planes(xor, tensor.element_size())
            frame = compressor.compress(xor.tobytes())
            out.write(frame)
            tensors[name] = {"dtype": _dtype_name(tensor), "shape": list(tensor.shape),
                             "offset": offset, "length": len(frame),
                             "sha256": hashlib.sha256(raw).hexdigest()}
            offset += len(frame)
            raw_total += raw.size
    manifest = DeltaManifest(reference=reference_identity, tensors=tensors,
                             byte_planes=byte_planes, level=level)
    _write_json(os.path.join(directory, DELTA_MANIFEST_FILE), manifest.__dict__)
    return DeltaStats(raw_bytes=raw_total, compressed_bytes=offset)


def apply_delta(reference: Mapping[str, torch.Tensor], directory: str, *,
                reference_identity: str | None = None) -> dict[str, torch.Tensor]:
    """Reconstruct a delta snapshot's weights from its reference weights (not modified).

    Args:
        reference: the weights of the snapshot the delta was taken against.
        directory: a local directory with ``delta.bin`` and ``delta_manifest.json``.
        reference_identity: the identity of ``reference``; if given, it must equal the
            manifest's ``reference`` (a delta applied to other weights gives garbage).

    Returns:
        New tensors (CPU), every one checked against the manifest's SHA-256.

    Raises:
        SnapshotMismatchError: wrong reference, or names/dtypes/shapes that differ.
        SnapshotCorruptError: a truncated or altered ``delta.bin`` or a failed checksum.
    """
    manifest = read_delta_manifest(directory)
    if reference_identity is not None and reference_identity != manifest.reference:
        raise SnapshotMismatchError(
            f"delta {directory} applies to {manifest.reference}, not to {reference_identity}")
    _check_compatible(manifest.tensors, reference, f"delta {directory}")
    decompressor = zstandard.ZstdDecompressor()
    path = os.path.join(directory, DELTA_DATA_FILE)
    with open(path, "rb") as f:
        blob = memoryview(f.read())  # frames are sliced out without copies
    result: dict[str, torch.Tensor] = {}
    for name, entry in manifest.tensors.items():
        ref = _raw_bytes(reference[name])
        frame = blob[entry["offset"]:entry["offset"] + entry["length"]]
        try:
            xor = np.frombuffer(decompressor.decompress(frame, max_output_size=ref.size),
                                dtype=np.uint8)
        except zstandard.ZstdError as e:
            raise SnapshotCorruptError(f"{path}: the frame of tensor {name!r} does not "
                                       f"decompress ({e}); the delta is corrupt: save a new "
                                       f"base snapshot") from e
        if xor.size != ref.size:
            raise SnapshotCorruptError(f"{path}: tensor {name!r} decompresses to {xor.size} "
                                       f"bytes, expected {ref.size}; the delta is corrupt")
        itemsize = _DTYPES[entry["dtype"]].itemsize
        if manifest.byte_planes and itemsize > 1:
            xor = _from_planes(xor, itemsize)
        raw = np.bitwise_xor(xor, ref)
        if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise SnapshotCorruptError(
                f"{path}: tensor {name!r} reconstructs to bytes that fail the manifest's "
                f"SHA-256; the delta is corrupt or was applied to other weights than "
                f"{manifest.reference}")
        result[name] = _tensor_from_bytes(raw, entry["dtype"], entry["shape"])
    return result


def _check_compatible(target: Mapping[str, Any], reference: Mapping[str, torch.Tensor],
                      what: str) -> None:
    if set(target) != set(reference):
        missing = sorted(set(target) - set(reference))[:5]
        extra = sorted(set(reference) - set(target))[:5]
        raise SnapshotMismatchError(f"{what}: tensor names differ from the reference weights "
                                    f"(not in the reference: {missing}; only in the reference: "
                                    f"{extra})")
    for name, value in target.items():
        dtype, shape = ((_dtype_name(value), list(value.shape)) if isinstance(value, torch.Tensor)
                        else (value["dtype"], value["shape"]))
        ref = reference[name]
        if dtype != _dtype_name(ref) or shape != list(ref.shape):
            raise SnapshotMismatchError(f"{what}: tensor {name!r} is {dtype}{shape}, the "
                                        f"reference has {_dtype_name(ref)}{list(ref.shape)}")


# ------------------------------------------------------------------------------- store access
def load_snapshot_weights(store: CheckpointStore, identity: str,
                          default_job_id: str | None = None) -> dict[str, torch.Tensor]:
    """The weights of any sampler snapshot, following a delta's chain back to its base.

    Every tensor is verified against its manifest; the result is bitwise the weights the trainer
    saved (in the snapshot's dtype).

    Raises:
        CheckpointNotFoundError: a snapshot of the chain is missing or expired.
        SnapshotMismatchError, SnapshotCorruptError: a file does not match its manifest.
    """
    chain: list[tuple[str, str]] = []  # (identity, local dir) of deltas, newest first
    current = identity
    seen: set[str] = set()
    while True:
        job_id, name = parse_snapshot_identity(current, default_job_id)
        current = make_snapshot_identity(job_id, name)
        if current in seen:
            raise SnapshotCorruptError(f"snapshot {identity}: its delta chain loops at {current}")
        seen.add(current)
        meta = store.get_sampler(job_id, name)
        entry_dir = store.sampler_dir(job_id, name)
        if meta.snapshot_type == "INFERENCE_ARC_V2":
            chain.append((current, entry_dir))
            current = _manifest_reference(store, entry_dir)
            continue
        weights = load_base_weights(store, entry_dir, current)
        break
    for delta_identity, entry_dir in reversed(chain):
        with store.local_copy(entry_dir) as local:
            try:
                weights = apply_delta(weights, local, reference_identity=current)
            except SnapshotError as e:
                raise type(e)(f"snapshot {delta_identity}: {e}") from e
        current = delta_identity
    return weights


def load_base_weights(store: CheckpointStore, entry_dir: str, identity: str,
                      ) -> dict[str, torch.Tensor]:
    """The tensors of a base snapshot, checked against ``weights_manifest.json`` if present."""
    with store.local_copy(entry_dir) as local:
        files = sorted(f for f in os.listdir(local) if f.endswith(".safetensors"))
        if not files:
            raise SnapshotCorruptError(f"snapshot {identity} has no .safetensors file in "
                                       f"{store.url(entry_dir)}; save a new base snapshot")
        weights: dict[str, torch.Tensor] = {}
        for file in files:
            weights.update(load_file(os.path.join(local, file)))
        expected = read_weights_manifest(local)
    if expected is not None:
        verify_weights(weights, expected, f"snapshot {identity}")
    return weights


def merge_lora_weights(base: Mapping[str, torch.Tensor], adapter_dir: str,
                       identity: str) -> dict[str, torch.Tensor]:
    """``base`` with a PEFT LoRA adapter directory merged in: ``W + scale * B @ A`` per module.

    ``scale`` is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), as peft's ``merge_and_unload``
    computes it; the sum is done in fp32 and cast back to each base tensor's dtype.

    Raises:
        SnapshotMismatchError: the adapter targets a module the base does not have, or uses a
            variant (DoRA) this merge does not implement.
    """
    config = _read_json(os.path.join(adapter_dir, "adapter_config.json"), required=True)
    if config.get("use_dora"):
        raise SnapshotMismatchError(f"snapshot {identity} is a DoRA adapter; deployments merge "
                                    f"plain LoRA adapters only")
    rank = config["r"]
    scale = config["lora_alpha"] / (rank ** 0.5 if config.get("use_rslora") else rank)
    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    merged = dict(base)
    for key, lora_a in adapter.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        target = f"{module}.weight"
        lora_b = adapter.get(key.replace(".lora_A.", ".lora_B."))
        if target not in base or lora_b is None:
            raise SnapshotMismatchError(f"snapshot {identity}: adapter module {module!r} has no "
                                        f"matching weight in the base model (or no lora_B)")
        weight = base[target]
        merged[target] = (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(
            weight.dtype)
    return merged


def _manifest_reference(store: CheckpointStore, entry_dir: str) -> str:
    with store.local_copy(entry_dir) as local:
        return read_delta_manifest(local).reference


# ------------------------------------------------------------------------------- json
def _write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)


def _read_json(path: str, required: bool) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        if required:
            raise SnapshotCorruptError(f"{path} is missing; the snapshot is incomplete") from None
        return None
    except json.JSONDecodeError as e:
        raise SnapshotCorruptError(f"{path} is corrupt ({e}); save a new snapshot") from e


# ------------------------------------------------------------------------------- writing
def sampler_weights(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU copies of the model's weights for a snapshot, floating tensors cast to ``dtype``.

    Always copies (``.to`` would alias the live parameter when the dtype already matches, and a
    delta chain must keep the snapshot's bytes while training moves on). Tied tensors (an
    ``lm_head`` sharing the embedding's storage) are kept once, under their first name, as
    ``save_pretrained`` does.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        target = dtype if tensor.is_floating_point() else tensor.dtype
        weights[name] = tensor.detach().to("cpu", dtype=target, copy=True).contiguous()
    return weights


def write_base_snapshot(directory: str, model: Any, tokenizer: Any,
                        weights: Mapping[str, torch.Tensor]) -> None:
    """A Hugging Face directory of ``weights`` (+ config, tokenizer, weights manifest).

    ``config.json`` records the weights' dtype, so ``from_pretrained(dir, dtype="auto")`` loads
    them as stored and ``from_pretrained(dir)`` / ``dtype=torch.float32`` upcasts exactly.
    """
    model.save_pretrained(directory, state_dict=dict(weights), safe_serialization=True)
    floating = {t.dtype for t in weights.values() if t.is_floating_point()}
    if len(floating) == 1:
        config_path = os.path.join(directory, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["dtype"] = _DTYPES_BY_TORCH[floating.pop()]
        _write_json(config_path, config)
    tokenizer.save_pretrained(directory)
    write_weights_manifest(directory, weights)


_DTYPES_BY_TORCH = {dtype: name for name, dtype in _DTYPES.items()}
