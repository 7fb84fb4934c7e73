"""Delta encodings of sampler snapshots: each tensor as ``new XOR reference`` (in 4-bit
symbols for the common carry runs, or byte planes), or as its per-element move in ulps,
zstd-compressed; :func:`encode_delta` picks the smallest per tensor and :func:`apply_delta`
rebuilds the weights, verifying every checksum. Why these encodings: the module docstring of
:mod:`training.sdk.snapshots`."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zstandard

from training.sdk.snapshot_format import (
    CHECKSUM,
    CHECKSUMS,
    DEFAULT_DELTA_ENCODING,
    DELTA_DATA_FILE,
    DELTA_ENCODINGS,
    DTYPES,
    INTS,
    UINTS,
    ZSTD_LEVEL,
    DeltaManifest,
    DeltaStats,
    SnapshotCorruptError,
    SnapshotMismatchError,
    dtype_name,
    entry_checksum,
    raw_bytes,
    read_delta_manifest,
    tensor_from_bytes,
    write_json,
)
from training.sdk.store import (
    DELTA_MANIFEST_FILE,
)


def _to_planes(data: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte ``k`` of every element together: sign/exponent bytes compress apart from mantissa."""
    data = data.reshape(-1).view(np.uint8)
    if itemsize == 1:
        return data
    planes = np.empty((itemsize, data.size // itemsize), dtype=np.uint8)
    elements = data.reshape(-1, itemsize)
    for k in range(itemsize):  # one strided copy per plane: ~6x faster than a transpose copy
        planes[k] = elements[:, k]
    return planes.reshape(-1)


def _from_planes(data: np.ndarray, itemsize: int) -> np.ndarray:
    """Inverse of :func:`_to_planes`; always a new, writable array."""
    if itemsize == 1:
        return data.copy()
    out = np.empty(data.size, dtype=np.uint8)
    elements = out.reshape(-1, itemsize)
    planes = data.reshape(itemsize, -1)
    for k in range(itemsize):
        elements[:, k] = planes[k]
    return out


def _zigzag(delta: np.ndarray, itemsize: int) -> np.ndarray:
    """0, -1, +1, -2, ... -> 0, 1, 2, 3, ... (unsigned, same width; wrapping differences)."""
    signed = delta.view(INTS[itemsize])
    return ((signed << 1) ^ (signed >> (8 * itemsize - 1))).view(UINTS[itemsize])


def _unzigzag_(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_zigzag`, in place on a writable unsigned array (returned)."""
    sign = z & 1
    np.subtract(0, sign, out=sign)  # unsigned: 0 - 1 wraps to all ones
    z >>= 1
    z ^= sign
    return z


_XOR_PATTERNS = (0x1, 0x3, 0x7, 0xF, 0x1F, 0x3F, 0x7F, 0x2, 0x6, 0xE, 0x1E, 0x5, 0xD, 0x4, 0xC)
"""XOR values of the ``xor-symbols`` symbols 1-15 (0: the element did not change). A move of one
ulp flips a run of low bits (0x1, 0x3, 0x7, ...: 80% of the changed bf16 elements after one
step at lr 1e-5); the others are the commonest XORs of moves of a few ulps."""


@dataclass(frozen=True)
class _SymbolCode:
    """How a symbol encoding turns symbols back into elements (see the module docstring)."""

    bits: int
    """Bits per symbol: 2 (four per packed byte) or 4 (two per packed byte)."""
    combine: np.ufunc
    """Combines a decoded value with the reference element: ``add`` (moves) or ``bitwise_xor``."""
    xor: bool
    """Escape values are XORs as they are (else ``z - 3`` of a zigzag move)."""

    def values(self, itemsize: int) -> np.ndarray:
        """Symbol -> the value combined with the reference (escapes are written as 0 -> 0)."""
        uint = UINTS[itemsize]
        if self.xor:
            return np.array((0, *_XOR_PATTERNS), dtype=uint)
        return np.array([0, np.iinfo(uint).max, 1, 0], dtype=uint)  # 0, -1, +1 (wrapping)


_SYMBOL_CODES = {"ternary": _SymbolCode(bits=2, combine=np.add, xor=False),
                 "xor-symbols": _SymbolCode(bits=4, combine=np.bitwise_xor, xor=True)}
"""The encodings whose tensors share symbol and escape frames per element width."""


@functools.cache
def _byte_symbols(bits: int) -> np.ndarray:
    """Packed byte -> its ``8 // bits`` symbols (first element in the low bits)."""
    per_byte = 8 // bits
    return np.stack([(np.arange(256) >> (bits * k)) & ((1 << bits) - 1)
                     for k in range(per_byte)], axis=1).astype(np.uint8)


@functools.cache
def _pair_table(encoding: str, itemsize: int) -> np.ndarray | None:
    """Two packed bytes (one little-endian uint16) -> the values of their 8 (2-bit) or 4 (4-bit)
    symbols, as one 4-, 8- or 16-byte item.

    One lookup per 2 packed bytes: ~3x faster than per packed byte (fewer, wider indices). None
    where the items' layout does not hold (big-endian hosts, items wider than 16 bytes).
    """
    code = _SYMBOL_CODES[encoding]
    width = 2 * (8 // code.bits) * itemsize
    item = {4: np.uint32, 8: np.uint64, 16: np.complex128}.get(width)  # complex: a copy unit
    if item is None or sys.byteorder != "little":
        return None
    values, symbols = code.values(itemsize), _byte_symbols(code.bits)
    codes = np.arange(1 << 16)
    table = np.concatenate([values[symbols[codes & 0xFF]], values[symbols[codes >> 8]]], axis=1)
    return np.ascontiguousarray(table).view(item).reshape(-1)


_local = threading.local()



# ------------------------------------------------------------------------------- deltas
def encode_delta(new: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                 directory: str, *, reference_identity: str,
                 encodings: Sequence[str] = DELTA_ENCODINGS[DEFAULT_DELTA_ENCODING],
                 level: int = ZSTD_LEVEL) -> DeltaStats:
    """Write ``new`` encoded against ``reference`` (zstd) and its manifest into ``directory``.

    Every tensor is tried in each of ``encodings`` (by default the ``xor`` setting's
    ``xor-symbols`` and ``xor``; ``ternary`` and ``dense`` for ``ulp``: see the module docstring
    and :data:`DELTA_ENCODINGS`) and stored in the smallest; a tensor equal to its reference is stored as
    ``unchanged`` (no bytes). Both mappings must have the same tensor names, dtypes and shapes
    (a delta never changes the architecture); ``reference_identity`` is recorded as the
    snapshot the delta applies to.

    Raises:
        SnapshotMismatchError: names, dtypes or shapes differ.
        ValueError: an unknown encoding.
    """
    unknown = set(encodings) - set(_ENCODERS)
    if unknown or not encodings:
        raise ValueError(f"encodings={tuple(encodings)!r}: expected some of {tuple(_ENCODERS)}")
    _check_compatible(new, reference, f"delta against {reference_identity}")
    compressors = _Compressors(level)
    tensors: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    shared_parts: dict[str, list[tuple[str, tuple[np.ndarray, ...]]]] = {}
    offset = raw_total = 0
    with open(os.path.join(directory, DELTA_DATA_FILE), "wb") as out:
        for name, tensor in new.items():
            raw = raw_bytes(tensor)
            ref = raw_bytes(reference[name])
            itemsize = _itemsize(dtype_name(tensor))
            entry: dict[str, Any] = {"dtype": dtype_name(tensor), "shape": list(tensor.shape),
                                     "offset": offset, CHECKSUM: CHECKSUMS[CHECKSUM](raw)}
            if np.array_equal(raw, ref):
                entry.update(encoding="unchanged", lengths=[])
                frames: list[bytes] = []
            else:
                best = None
                for encoding in encodings:
                    frames, fields = _ENCODERS[encoding](raw, ref, itemsize, compressors)
                    size = sum(len(f) for f in frames)
                    if best is None or size < best[0]:
                        best = (size, encoding, frames, fields)
                _, encoding, frames, fields = best
                streams = fields.pop("streams", None)
                if encoding in _SYMBOL_CODES:  # its frames are shared: written after the loop
                    shared_parts.setdefault(f"{encoding}-{itemsize}", []).append(
                        (name, streams))
                    frames = []
                entry.update(encoding=encoding, lengths=[len(f) for f in frames], **fields)
            for frame in frames:
                out.write(frame)
                offset += len(frame)
            tensors[name] = entry
            counts[entry["encoding"]] = counts.get(entry["encoding"], 0) + 1
            raw_total += raw.size
        shared = {}
        for key, parts in shared_parts.items():
            itemsize = int(key.rsplit("-", 1)[1])
            frames = _shared_symbol_frames([streams for _, streams in parts], itemsize,
                                           compressors)
            shared[key] = {"tensors": [name for name, _ in parts], "offset": offset,
                           "lengths": [len(f) for f in frames]}
            for frame in frames:
                out.write(frame)
                offset += len(frame)
    manifest = DeltaManifest(reference=reference_identity, tensors=tensors, level=level,
                             streams=shared)
    write_json(os.path.join(directory, DELTA_MANIFEST_FILE), dataclasses.asdict(manifest))
    return DeltaStats(raw_bytes=raw_total, compressed_bytes=offset, encodings=counts)


class _Compressors:
    """zstd compressors of one delta: ``bytes`` for byte planes, ``symbols`` for packed symbols."""

    def __init__(self, level: int) -> None:
        self.bytes = zstandard.ZstdCompressor(level=level)
        # min_match=7: in near-random symbol bytes, short matches cost more than the literals
        # they replace (-3% on the symbols of one bf16 step; +0.6% on byte planes, so not there).
        self.symbols = zstandard.ZstdCompressor(
            compression_params=zstandard.ZstdCompressionParameters.from_level(level, min_match=7))


def _itemsize(dtype_name: str) -> int:
    return 1 if dtype_name == "bool" else DTYPES[dtype_name].itemsize


def _encode_ternary(raw: np.ndarray, ref: np.ndarray, itemsize: int,
                    compressors: _Compressors) -> tuple[list[bytes], dict[str, Any]]:
    uint = UINTS[itemsize]
    z = _zigzag(raw.view(uint) - ref.view(uint), itemsize)
    escaped = _with_fillers(np.flatnonzero(z > 2))
    values = z[escaped] - 3  # wraps around for fillers (z <= 2); the decoder's + 3 wraps back
    return _encode_symbols("ternary", z.astype(np.uint8), escaped, values, itemsize,
                           compressors)


def _encode_xor_symbols(raw: np.ndarray, ref: np.ndarray, itemsize: int,
                        compressors: _Compressors) -> tuple[list[bytes], dict[str, Any]]:
    uint = UINTS[itemsize]
    xor = np.bitwise_xor(raw, ref).view(uint)
    symbols = _xor_symbol_of(xor, itemsize)
    escaped = _with_fillers(np.flatnonzero(symbols == _ESCAPE))
    return _encode_symbols("xor-symbols", symbols, escaped, xor[escaped], itemsize, compressors)


_ESCAPE = 255
"""Symbol of an element no symbol stands for, before packing (packed as 0)."""


@functools.cache
def _xor_lookup(itemsize: int) -> np.ndarray:
    """XOR value -> its ``xor-symbols`` symbol or :data:`_ESCAPE`, for 1- and 2-byte elements."""
    lookup = np.full(1 << (8 * itemsize), _ESCAPE, dtype=np.uint8)
    lookup[0] = 0
    lookup[list(_XOR_PATTERNS)] = np.arange(1, len(_XOR_PATTERNS) + 1)
    return lookup


def _xor_symbol_of(xor: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize <= 2:  # one lookup
        return np.take(_xor_lookup(itemsize), xor.astype(np.intp))
    symbols = np.full(xor.size, _ESCAPE, dtype=np.uint8)
    symbols[xor == 0] = 0
    for symbol, pattern in enumerate(_XOR_PATTERNS, 1):
        symbols[xor == pattern] = symbol
    return symbols


def _encode_symbols(encoding: str, symbols: np.ndarray, escaped: np.ndarray, values: np.ndarray,
                    itemsize: int, compressors: _Compressors,
                    ) -> tuple[list[bytes], dict[str, Any]]:
    """Frames and manifest fields of a symbol encoding: ``symbols`` (uint8; escapes anything)
    packed ``8 // bits`` per byte, the gaps between the ``escaped`` positions and ``values``."""
    bits = _SYMBOL_CODES[encoding].bits
    per_pair = 16 // bits
    padded = np.zeros(-(-symbols.size // per_pair) * per_pair, dtype=np.uint8)  # whole pairs
    padded[:symbols.size] = symbols
    padded[escaped] = 0  # the most frequent symbol: escapes cost least in the symbol frame
    groups = padded.reshape(-1, 8 // bits)
    packed = groups[:, 0].copy()
    for k in range(1, groups.shape[1]):
        packed |= groups[:, k] << (bits * k)
    gaps = np.diff(escaped, prepend=-1).astype(np.uint8)
    # Compressed alone to compare sizes; stored in the shared frames of its stream.
    frames = _shared_symbol_frames([(packed, gaps, values)], itemsize, compressors)
    return frames, {"escapes": int(escaped.size), "streams": (packed, gaps, values)}


def _shared_symbol_frames(parts: list[tuple[np.ndarray, ...]], itemsize: int,
                          compressors: _Compressors) -> list[bytes]:
    """Frames of the (packed symbols, gaps, escape values) of a stream's tensors, joined."""
    frames = [compressors.symbols.compress(b"".join(p[0].tobytes() for p in parts))]
    if any(p[1].size for p in parts):
        frames.append(compressors.bytes.compress(b"".join(p[1].tobytes() for p in parts)))
        values = np.concatenate([p[2] for p in parts])
        frames.append(compressors.bytes.compress(_to_planes(values, itemsize).tobytes()))
    return frames


def _with_fillers(escaped: np.ndarray, longest: int = 255) -> np.ndarray:
    """Escape positions plus *fillers* wherever two are more than ``longest`` apart (the first
    counted from -1), so every gap fits one byte. A filler is an element stored through the
    escape frames like an escape; one per 255 escape-free elements costs ~1%, 2-byte gaps ~5%.
    """
    gaps = np.diff(escaped, prepend=-1)
    long = np.flatnonzero(gaps > longest)
    if long.size == 0:
        return escaped
    previous = np.where(long > 0, escaped[long - 1], -1)
    per_gap = (gaps[long] - 1) // longest
    steps = np.arange(per_gap.sum()) - np.repeat(np.cumsum(per_gap) - per_gap, per_gap) + 1
    fillers = np.repeat(previous, per_gap) + longest * steps
    return np.sort(np.concatenate([escaped, fillers]))


def _encode_dense(raw: np.ndarray, ref: np.ndarray, itemsize: int,
                  compressors: _Compressors) -> tuple[list[bytes], dict[str, Any]]:
    uint = UINTS[itemsize]
    z = _zigzag(raw.view(uint) - ref.view(uint), itemsize)
    return [compressors.bytes.compress(_to_planes(z, itemsize).tobytes())], {}


def _encode_xor(raw: np.ndarray, ref: np.ndarray, itemsize: int,
                compressors: _Compressors) -> tuple[list[bytes], dict[str, Any]]:
    xor = _to_planes(np.bitwise_xor(raw, ref), itemsize)
    return [compressors.bytes.compress(xor.tobytes())], {}


_ENCODERS = {"xor-symbols": _encode_xor_symbols, "xor": _encode_xor, "ternary": _encode_ternary,
             "dense": _encode_dense}


def apply_delta(reference: Mapping[str, torch.Tensor], directory: str, *,
                reference_identity: str | None = None,
                manifest: DeltaManifest | None = None) -> dict[str, torch.Tensor]:
    """Reconstruct a delta snapshot's weights from its reference weights (not modified).

    Args:
        reference: the weights of the snapshot the delta was taken against.
        directory: a local directory with ``delta.bin`` and ``delta_manifest.json``.
        reference_identity: the identity of ``reference``; if given, it must equal the
            manifest's ``reference`` (a delta applied to other weights gives garbage).
        manifest: the directory's manifest, if the caller has already read it.

    Returns:
        The new weights (CPU), every one checked against the manifest's checksum. A tensor
        stored as ``unchanged`` is the reference's own tensor object (a checked alias, not a
        copy): neither mapping's tensors may be modified in place afterwards.

    Raises:
        SnapshotMismatchError: wrong reference, or names/dtypes/shapes that differ.
        SnapshotCorruptError: a truncated or altered ``delta.bin`` or a failed checksum.
    """
    manifest = manifest or read_delta_manifest(directory)
    if reference_identity is not None and reference_identity != manifest.reference:
        raise SnapshotMismatchError(
            f"delta {directory} applies to {manifest.reference}, not to {reference_identity}")
    _check_compatible(manifest.tensors, reference, f"delta {directory}")
    path = os.path.join(directory, DELTA_DATA_FILE)
    with open(path, "rb") as f:
        blob = memoryview(f.read())  # frames are sliced out without copies
    # One thread: decoding tensors in 2 threads took 1.3-1.6x longer on 2 cores.
    refs = {name: raw_bytes(reference[name]) for name in manifest.tensors}
    raws: dict[str, np.ndarray] = {}
    groups: dict[tuple[str, int], list[tuple[str, Mapping[str, Any], list[memoryview]]]] = {}
    for name, entry in manifest.tensors.items():
        frames = _entry_frames(name, entry, blob, path)
        if entry["encoding"] in _SYMBOL_CODES:  # decoded together: numpy calls cost per tensor
            key = (entry["encoding"], _itemsize(entry["dtype"]))
            groups.setdefault(key, []).append((name, entry, frames))
        else:
            raws[name] = _decode_tensor(name, entry, refs[name], frames, path)
    for (encoding, itemsize), group in groups.items():
        raws.update(_decode_symbols(encoding, group, manifest.streams, refs, itemsize, blob,
                                    path))
    weights = {}
    for name, entry in manifest.tensors.items():
        raw = raws[name]
        algorithm, digest = entry_checksum(entry, f"{path}: the manifest entry of {name!r}")
        if CHECKSUMS[algorithm](raw) != digest:
            raise SnapshotCorruptError(
                f"{path}: tensor {name!r} reconstructs to bytes that fail the manifest's "
                f"checksum ({algorithm}); the delta is corrupt or was applied to other "
                f"weights than {manifest.reference}")
        weights[name] = (reference[name] if raw is refs[name] else
                         tensor_from_bytes(raw, entry["dtype"], entry["shape"]))
    return weights


_FRAMES = {"unchanged": 0, "dense": 1, "xor": 1, "xor-flat": 1, "ternary": 0, "xor-symbols": 0}
"""Frames of its own per tensor of each encoding (symbol encodings share their stream's)."""


def _entry_frames(name: str, entry: Mapping[str, Any], blob: memoryview, path: str,
                  ) -> list[memoryview]:
    """The frames of one tensor, checked against its encoding."""
    encoding = entry.get("encoding")
    if encoding not in _FRAMES:
        raise SnapshotCorruptError(f"{path}: tensor {name!r} has encoding {encoding!r}, which "
                                   f"this version does not know; the delta was written by a "
                                   f"newer version of homefire: upgrade to read it")
    frames = _frames(f"tensor {name!r}", entry, blob, path)
    if len(frames) != _FRAMES[encoding]:
        raise SnapshotCorruptError(f"{path}: tensor {name!r} ({encoding}) has {len(frames)} "
                                   f"frames, expected {_FRAMES[encoding]}; the delta is corrupt")
    return frames


def _decode_tensor(name: str, entry: Mapping[str, Any], ref: np.ndarray,
                   frames: list[memoryview], path: str) -> np.ndarray:
    """The raw bytes of one tensor not in a symbol encoding (``ref`` itself when
    ``unchanged``), before its checksum."""
    encoding = entry["encoding"]
    if encoding == "unchanged":
        return ref
    itemsize = _itemsize(entry["dtype"])
    if encoding in ("xor", "xor-flat"):
        xor = _decompress(frames[0], ref.size, f"tensor {name!r}", path)
        if encoding == "xor":
            xor = _from_planes(xor, itemsize)
        return np.bitwise_xor(xor, ref)
    uint = UINTS[itemsize]
    z = _from_planes(_decompress(frames[0], ref.size, f"tensor {name!r}", path),
                     itemsize).view(uint)
    return np.add(_unzigzag_(z), ref.view(uint), out=z).view(np.uint8)


def _decode_symbols(encoding: str, group: list[tuple[str, Mapping[str, Any], list[memoryview]]],
                    streams: Mapping[str, Mapping[str, Any]], refs: Mapping[str, np.ndarray],
                    itemsize: int, blob: memoryview, path: str) -> dict[str, np.ndarray]:
    """The raw bytes of the tensors of one symbol encoding and element width, before their
    checksums.

    They share their frames (one zstd frame per tensor and stream took ~1.5 ms more on the 71
    tensors of a 10M model) and are decoded with one numpy call per step, into slices of one
    buffer.
    """
    code = _SYMBOL_CODES[encoding]
    per_pair = 16 // code.bits  # elements per two packed bytes
    key = f"{encoding}-{itemsize}"
    what = f"the {key} stream"
    stream = streams.get(key, {})
    names = list(stream.get("tensors", []))
    entries = {name: entry for name, entry, _ in group}
    if sorted(names) != sorted(entries):
        raise SnapshotCorruptError(f"{path}: {what} lists tensors {sorted(names)[:5]}, the "
                                   f"manifest stores {sorted(entries)[:5]} that way; the "
                                   f"manifest is corrupt")
    uint = UINTS[itemsize]
    counts = np.array([refs[name].size // itemsize for name in names], dtype=np.intp)
    pairs = -(-counts // per_pair)  # each tensor's symbols fill whole pairs of packed bytes
    starts = per_pair * (np.cumsum(pairs) - pairs)
    escapes = np.array([entries[name].get("escapes", 0) for name in names], dtype=np.intp)
    if (escapes < 0).any():
        raise SnapshotCorruptError(f"{path}: a negative escape count in the manifest; the "
                                   f"manifest is corrupt")
    first = np.cumsum(escapes) - escapes  # index of each tensor's first escape
    total = int(escapes.sum())
    frames = _frames(what, stream, blob, path)
    if len(frames) != (3 if total else 1):
        raise SnapshotCorruptError(f"{path}: {what} has {len(frames)} frames, expected "
                                   f"{3 if total else 1}; the delta is corrupt")
    packed = _decompress(frames[0], 2 * int(pairs.sum()), what, path)
    table = _pair_table(encoding, itemsize)
    if table is not None:  # one lookup gives the values of two packed bytes
        values = np.take(table, packed.view("<u2").astype(np.intp)).view(uint)
    else:
        per_byte = _byte_symbols(code.bits).view(f"<u{8 // code.bits}").reshape(256)
        symbols = np.take(per_byte, packed.astype(np.intp))
        values = np.take(code.values(itemsize), symbols.view(np.uint8))
    raws = {}
    for i, name in enumerate(names):
        out = values[starts[i]:starts[i] + counts[i]]
        code.combine(out, refs[name].view(uint), out=out)  # in the lookup's buffer: no copy
        raws[name] = out.view(np.uint8)
    if total:
        # Escape positions come as gaps (a cumulative sum away), not from a scan of the
        # symbols: finding 5% of elements in a mask costs ~3x the rest of the decode.
        gaps = _decompress(frames[1], total, what, path).astype(np.intp)
        np.cumsum(gaps, out=gaps)  # in place: 3-6x faster than into a new array
        has = np.flatnonzero(escapes)
        before = np.where(first[has] > 0, gaps[first[has] - 1], 0)  # cumsum up to the tensor
        lowest = gaps[first[has]] - before - 1
        highest = gaps[first[has] + escapes[has] - 1] - before - 1
        bad = np.flatnonzero((lowest < 0) | (highest >= counts[has]))
        if bad.size:  # gaps >= 0: each tensor's first and last escapes bound the others
            i = has[bad[0]]
            raise SnapshotCorruptError(f"{path}: tensor {names[i]!r} has an escape outside its "
                                       f"{counts[i]} elements; the delta is corrupt")
        gaps += np.repeat(starts[has] - before - 1, escapes[has])  # positions in ``values``
        stored = _from_planes(_decompress(frames[2], total * itemsize, what, path),
                              itemsize).view(uint)
        if not code.xor:
            stored += 3
            _unzigzag_(stored)
        # Their symbols decoded to 0 (no change); fillers come back the same way.
        code.combine.at(values, gaps, stored)
    return raws


def _frames(what: str, entry: Mapping[str, Any], blob: memoryview, path: str,
            ) -> list[memoryview]:
    """The frames an entry (a tensor's or a stream's) points at in ``delta.bin``."""
    offset, frames = entry.get("offset", 0), []
    for length in entry.get("lengths", []):
        if offset < 0 or length < 0 or offset + length > len(blob):
            raise SnapshotCorruptError(f"{path}: the frames of {what} run past the end of the "
                                       f"file ({len(blob)} bytes); the delta is corrupt "
                                       f"(truncated?): save a new base snapshot")
        frames.append(blob[offset:offset + length])
        offset += length
    return frames


def _decompress(frame: memoryview, size: int, what: str, path: str) -> np.ndarray:
    """A frame's bytes, refused unless it holds exactly ``size`` bytes (checked before any
    allocation: a damaged header must not ask for gigabytes)."""
    try:
        declared = zstandard.frame_content_size(frame)
        if declared != size:
            raise SnapshotCorruptError(f"{path}: a frame of {what} decompresses to {declared} "
                                       f"bytes, expected {size}; the delta is corrupt")
        decompressor = getattr(_local, "decompressor", None)
        if decompressor is None:  # one per thread: they are not thread-safe
            decompressor = _local.decompressor = zstandard.ZstdDecompressor()
        data = decompressor.decompress(frame)
    except zstandard.ZstdError as e:
        raise SnapshotCorruptError(f"{path}: a frame of {what} does not decompress ({e}); "
                                   f"the delta is corrupt: save a new base snapshot") from e
    return np.frombuffer(data, dtype=np.uint8)


def _check_compatible(target: Mapping[str, Any], reference: Mapping[str, torch.Tensor],
                      what: str) -> None:
    if set(target) != set(reference):
        missing = sorted(set(target) - set(reference))[:5]
        extra = sorted(set(reference) - set(target))[:5]
        raise SnapshotMismatchError(f"{what}: tensor names differ from the reference weights "
                                    f"(not in the reference: {missing}; only in the reference: "
                                    f"{extra})")
    for name, value in target.items():
        dtype, shape = ((dtype_name(value), list(value.shape)) if isinstance(value, torch.Tensor)
                        else (value["dtype"], value["shape"]))
        ref = reference[name]
        if dtype != dtype_name(ref) or shape != list(ref.shape):
            raise SnapshotMismatchError(f"{what}: tensor {name!r} is {dtype}{shape}, the "
                                        f"reference has {dtype_name(ref)}{list(ref.shape)}")


