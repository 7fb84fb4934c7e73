"""The on-disk format of sampler snapshots: file names, format versions, manifests, tensor
checksums and the errors of reading them (the encodings themselves are in
:mod:`training.sdk.delta_codec`; storing and loading snapshots in :mod:`training.sdk.snapshots`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash

from training.sdk.choices import Choice
from training.sdk.store import (
    DELTA_MANIFEST_FILE,
    WEIGHTS_MANIFEST_FILE,
    StoreError,
)

DELTA_DATA_FILE = "delta.bin"
DELTA_FORMAT = "homefire-delta/2"
LEGACY_DELTA_FORMAT = "homefire-xor-delta/1"
"""Format of deltas written before per-tensor encodings: XOR only, SHA-256; still read."""
WEIGHTS_FORMAT = "homefire-weights/2"
ZSTD_LEVEL = 1
"""zstd level of delta frames: level 3 compresses deltas no better than 1 and is slower."""
CHECKSUM = "xxh3_128"
"""Checksum of tensors in new manifests: XXH3-128 hashes ~45 GB/s here, SHA-256 ~1.8 GB/s."""
DELTA_ENCODINGS = {"xor": ("xor-symbols", "xor"), "ulp": ("ternary", "dense")}
"""The encodings :func:`encode_delta` tries per tensor under each ``delta_encoding`` setting
(``unchanged`` is implicit): ``xor`` (the default) stores ``new XOR reference``; ``ulp`` stores
the move of each element, 20-25% smaller (see the module docstring)."""
DEFAULT_DELTA_ENCODING = "xor"


class SnapshotType(Choice):
    """A sampler snapshot's ``checkpoint_type``."""

    base = "base"
    """Full weights: loads on its own."""
    delta = "delta"
    """The change since the chain's base (or the previous delta): small, loads onto it."""

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}
UINTS = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
INTS = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}
CHECKSUMS = {"xxh3_128": xxhash.xxh3_128_hexdigest,
              "sha256": lambda data: hashlib.sha256(data).hexdigest()}


class SnapshotError(StoreError):
    """Base class of sampler snapshot errors."""


class SnapshotMismatchError(SnapshotError, ValueError):
    """A delta does not fit the weights it is applied to (reference, keys, dtype or shape)."""


class SnapshotCorruptError(SnapshotError):
    """A snapshot's files do not match its manifest (truncated, altered or wrong checksum)."""


# ------------------------------------------------------------------------------- tensors
def raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (a view where the tensor is contiguous on CPU)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy()


def tensor_checksum(tensor: torch.Tensor, algorithm: str = CHECKSUM) -> str:
    """Checksum (hex) of a tensor's raw bytes in its own dtype: ``xxh3_128`` or ``sha256``."""
    return CHECKSUMS[algorithm](raw_bytes(tensor))


def entry_checksum(entry: Mapping[str, Any], where: str) -> tuple[str, str]:
    """(algorithm, hex digest) of a manifest entry (older manifests hold ``sha256``)."""
    for algorithm in CHECKSUMS:
        if algorithm in entry:
            return algorithm, entry[algorithm]
    raise SnapshotCorruptError(f"{where} has no checksum ({' or '.join(CHECKSUMS)}); the "
                               f"manifest is corrupt or from a newer version: save a new "
                               f"snapshot")


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def tensor_from_bytes(data: np.ndarray, dtype_name: str, shape: list[int]) -> torch.Tensor:
    dtype = DTYPES[dtype_name]
    tensor = torch.from_numpy(data.copy() if not data.flags.writeable else data)
    if dtype == torch.bool:
        return tensor.to(torch.bool).reshape(shape)
    return tensor.view(dtype).reshape(shape)


# ------------------------------------------------------------------------------- manifests
def write_weights_manifest(directory: str, weights: Mapping[str, torch.Tensor]) -> None:
    """Write ``weights_manifest.json``: dtype, shape and checksum of each tensor of a base."""
    manifest = {"format": WEIGHTS_FORMAT, "checksum": CHECKSUM,
                "tensors": {name: {"dtype": dtype_name(t), "shape": list(t.shape),
                                   CHECKSUM: tensor_checksum(t)}
                            for name, t in weights.items()}}
    write_json(os.path.join(directory, WEIGHTS_MANIFEST_FILE), manifest)


def read_weights_manifest(directory: str) -> dict[str, dict[str, Any]] | None:
    """The per-tensor entries of a base snapshot's manifest, or None if it has none."""
    payload = read_json(os.path.join(directory, WEIGHTS_MANIFEST_FILE), required=False)
    return None if payload is None else payload["tensors"]


def verify_weights(weights: Mapping[str, torch.Tensor], expected: Mapping[str, dict[str, Any]],
                   what: str) -> None:
    """Check keys, dtype, shape and checksum of ``weights`` against manifest entries.

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
        if dtype_name(tensor) != entry["dtype"] or list(tensor.shape) != entry["shape"]:
            raise SnapshotMismatchError(
                f"{what}: tensor {name!r} is {dtype_name(tensor)}{list(tensor.shape)}, its "
                f"manifest says {entry['dtype']}{entry['shape']}")
        algorithm, digest = entry_checksum(entry, f"{what}: the manifest entry of {name!r}")
        if tensor_checksum(tensor, algorithm) != digest:
            raise SnapshotCorruptError(f"{what}: tensor {name!r} fails its checksum "
                                       f"({algorithm}); the snapshot is corrupt: save a new one")


@dataclass
class DeltaManifest:
    """``delta_manifest.json``: what a delta applies to and what it must produce."""

    reference: str
    """Identity (``sampler://job/name``) of the snapshot whose weights the delta is taken
    against."""
    tensors: dict[str, dict[str, Any]]
    """Per tensor: ``dtype``, ``shape``, ``encoding`` (see the module docstring), ``offset`` of
    its first frame in ``delta.bin`` and ``lengths`` of its own frames (bytes; none for
    ``unchanged`` and the symbol encodings), ``escapes`` (escapes and fillers; symbol encodings
    only) and the checksum of the reconstructed tensor under the name of its algorithm
    (``xxh3_128``; ``sha256`` in format 1)."""
    compression: str = "zstd"
    level: int = ZSTD_LEVEL
    checksum: str = CHECKSUM
    """Algorithm of the per-tensor checksums."""
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Frames shared by several tensors: ``<encoding>-<element bytes>`` (``xor-symbols-2``,
    ``ternary-2``...) holds the ``tensors`` stored in that symbol encoding with elements of
    that width, in stream order, and the ``offset`` and
    ``lengths`` of its frames (symbols, then gaps and escape values if any tensor has
    escapes)."""
    format: str = DELTA_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeltaStats:
    """Sizes of one encoded delta, in bytes."""

    raw_bytes: int
    """Bytes of the new weights in their dtype (what a base snapshot's tensors take)."""
    compressed_bytes: int
    """Bytes of ``delta.bin``."""
    encodings: dict[str, int] = field(default_factory=dict)
    """Number of tensors stored in each encoding."""

    @property
    def ratio(self) -> float:
        """compressed / raw (0.1 = ten times smaller than the full weights)."""
        return self.compressed_bytes / max(self.raw_bytes, 1)


def read_delta_manifest(directory: str) -> DeltaManifest:
    """The manifest of a delta; format 1 manifests are converted to the format 2 layout.

    Raises:
        SnapshotCorruptError: missing, unreadable, or of an unknown format.
    """
    path = os.path.join(directory, DELTA_MANIFEST_FILE)
    payload = read_json(path, required=True)
    if payload.get("format") == LEGACY_DELTA_FORMAT:
        encoding = "xor" if payload.get("byte_planes", True) else "xor-flat"
        tensors = {name: {"dtype": e["dtype"], "shape": e["shape"], "encoding": encoding,
                          "offset": e["offset"], "lengths": [e["length"]], "sha256": e["sha256"]}
                   for name, e in payload["tensors"].items()}
        return DeltaManifest(reference=payload["reference"], tensors=tensors,
                             compression=payload.get("compression", "zstd"),
                             level=payload.get("level", ZSTD_LEVEL), checksum="sha256",
                             format=LEGACY_DELTA_FORMAT, extra=payload.get("extra", {}))
    if payload.get("format") != DELTA_FORMAT:
        raise SnapshotCorruptError(f"{path}: delta format {payload.get('format')!r} is neither "
                                   f"{DELTA_FORMAT!r} nor {LEGACY_DELTA_FORMAT!r}; it was "
                                   f"written by another version of homefire")
    known = {f.name for f in dataclasses.fields(DeltaManifest)}
    return DeltaManifest(**{k: v for k, v in payload.items() if k in known})



# ------------------------------------------------------------------------------- json
def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)


def read_json(path: str, required: bool) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        if required:
            raise SnapshotCorruptError(f"{path} is missing; the snapshot is incomplete") from None
        return None
    except json.JSONDecodeError as e:
        raise SnapshotCorruptError(f"{path} is corrupt ({e}); save a new snapshot") from e



DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
