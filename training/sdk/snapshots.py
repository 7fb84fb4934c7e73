"""Sampler snapshots on disk: full (``base``) weights, deltas, manifests and checksums.

A sampler snapshot is a directory in the store (``{root}/jobs/{job}/samplers/{snapshot_name}/``)
in one of two shapes:

* **base** (``INFERENCE_BASE``): a Hugging Face directory (``config.json``,
  ``model.safetensors``, tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` loads,
  plus ``weights_manifest.json`` with the dtype, shape and checksum of every tensor.
* **delta** (``INFERENCE_ARC_V2``): ``delta.bin`` and ``delta_manifest.json``. Every tensor is
  encoded against the *reference* snapshot's tensor (the previous snapshot of the chain) and
  compressed with zstd (frames concatenated). The manifest names the reference snapshot and
  holds, per tensor, the dtype, shape, encoding, frame offset/lengths and the checksum of the
  *reconstructed* tensor.

A delta is ``new XOR reference``, tensor by tensor, on the raw bytes (``current_weights =
reference XOR delta``), unless the trainer was set up with ``delta_encoding="ulp"``. Format
``homefire-delta/2``; each tensor is stored in the smallest of the encodings of its setting
(:data:`DELTA_ENCODINGS`):

* ``unchanged`` (any setting): the tensor's bytes equal the reference's; no frame.
* ``xor-symbols`` (``xor``): ``x = new XOR reference`` per element, read as a little-endian
  unsigned integer of the element's width. Frame 1: 4-bit symbols, two per byte (first element
  in the low bits), zero-padded to a multiple of 4 elements: 0 where ``x == 0``, ``s`` where
  ``x`` is the ``s``-th of the 15 XORs of :data:`_XOR_PATTERNS` (the runs of low bits a move of
  one ulp flips, then the commonest XORs of small moves), else 0 and the element is an
  *escape*. ``escapes`` in the manifest counts them: frame 2 holds the gaps between their
  positions (the first: its position + 1), one byte each (where escapes are more than 255
  apart, *fillers* in between, elements stored like escapes, keep every gap <= 255), frame 3
  their ``x`` in the element's width, in byte planes.
* ``xor`` (``xor``): ``x`` of every element in byte planes (byte ``k`` of every element
  together), for tensors where most elements changed by more than a few ulps.
* ``ternary`` (``ulp``): the move ``d = new - reference`` of each element on the raw bytes
  read as unsigned integers (wrapping; for floats of one sign, the move in ulps) and its
  zigzag code ``z`` (0, -1, +1, -2, ... -> 0, 1, 2, 3, ...): 2-bit symbols, four per byte,
  ``z`` where ``z <= 2``, else an escape (frames 2 and 3 as above, frame 3 holding ``z - 3``,
  wrapping).
* ``dense`` (``ulp``): ``z`` of every element, in byte planes.

The tensors of a symbol encoding (``xor-symbols``, ``ternary``) with elements of one width share
these frames, their parts joined in the order the manifest's ``streams`` entry
``<encoding>-<width>`` lists them (without any escape, frame 1 alone). Format
``homefire-xor-delta/1`` (``xor`` alone, SHA-256) is still read.

All are exact for any dtype: the reconstruction is bit for bit, and the checksums prove it on
every reconstruction. One optimizer step at a small learning rate moves most bf16 weights by 0
or 1 ulp. Their XOR is a run of low bits (0x1, 0x3, 0x7, ...: the carry), whose length costs
bits a move of +-1 does not: ``xor`` deltas are 20-25% larger than ``ulp`` ones (see
``benchmarks/sampler_snapshots.py`` and ``benchmarks/README.md``).

Checksums are XXH3-128 of each tensor's raw bytes (SHA-256 in manifests of older versions,
still verified). They catch accidental damage: a truncated or altered file, a delta applied to
other weights than its reference, a snapshot mixed up with another. They do not authenticate:
whoever can rewrite ``delta.bin`` can rewrite the manifest beside it (so could they with
SHA-256); trust comes from the store's access control.

Snapshot identities are ``sampler://<job_id>/<snapshot_name>`` (what ``SaveSamplerResult.path``
holds); :func:`parse_snapshot_identity` also accepts ``<job_id>:<snapshot_name>`` and, given a
default job, a bare snapshot name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file

from training.sdk.delta_codec import apply_delta, encode_delta
from training.sdk.names import (  # importable from here as before
    SAMPLER_SCHEME,
    make_snapshot_identity,
    parse_snapshot_identity,
)
from training.sdk.snapshot_format import (
    CHECKSUM,
    DEFAULT_DELTA_ENCODING,
    DELTA_DATA_FILE,
    DELTA_ENCODINGS,
    DELTA_FORMAT,
    DTYPE_NAMES,
    LEGACY_DELTA_FORMAT,
    WEIGHTS_FORMAT,
    ZSTD_LEVEL,
    DeltaManifest,
    DeltaStats,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotMismatchError,
    SnapshotType,
    read_delta_manifest,
    read_json,
    read_weights_manifest,
    tensor_checksum,
    verify_weights,
    write_json,
    write_weights_manifest,
)
from training.sdk.store import (
    CheckpointStore,
)

__all__ = [
    "CHECKSUM", "DEFAULT_DELTA_ENCODING", "DELTA_DATA_FILE", "DELTA_ENCODINGS", "DELTA_FORMAT",
    "LEGACY_DELTA_FORMAT", "SAMPLER_SCHEME", "WEIGHTS_FORMAT", "ZSTD_LEVEL",
    "DeltaManifest", "DeltaStats", "SnapshotCorruptError", "SnapshotError",
    "SnapshotMismatchError", "SnapshotType", "apply_delta", "encode_delta", "load_base_weights",
    "load_snapshot_weights", "make_snapshot_identity", "merge_lora_weights",
    "parse_snapshot_identity", "read_delta_manifest", "read_weights_manifest", "sampler_weights",
    "tensor_checksum", "verify_snapshot_files", "verify_weights", "write_base_snapshot",
    "write_weights_manifest",
]

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


def verify_snapshot_files(directory: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of every ``.safetensors`` file of a local snapshot (or promoted model)
    directory, checked against its ``weights_manifest.json`` when it has one.

    Raises:
        SnapshotCorruptError: a tensor fails its checksum.
        SnapshotMismatchError: tensors differ from the manifest in name, dtype or shape.
    """
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        weights.update(load_file(os.path.join(directory, file)))
    expected = read_weights_manifest(directory)
    if expected is not None:
        verify_weights(weights, expected, what)
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
    config = read_json(os.path.join(adapter_dir, "adapter_config.json"), required=True)
    if config.get("use_dora"):
        raise SnapshotMismatchError(f"snapshot {identity} is a DoRA adapter; deployments merge "
                                    f"plain LoRA adapters only")
    rank = config["r"]
    scale = config["lora_alpha"] / (rank ** 0.5 if config.get("use_rslora") else rank)
    adapter = verify_snapshot_files(adapter_dir, f"snapshot {identity}")
    wrapped = _wrapped_parameters(base, config.get("target_parameters") or [])
    merged = dict(base)
    for key, lora_a in adapter.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        lora_b = adapter.get(key.replace(".lora_A.", ".lora_B."))
        # peft nests one wrapper per targeted parameter of a module, the first registered
        # innermost: ``experts.lora_A`` adapts the module's last one, ``experts.base_layer.
        # lora_A`` the one before, and so on.
        unwrapped = module.replace(".base_layer", "")
        params = wrapped.get(unwrapped)
        depth = module.count(".base_layer")
        target = params[len(params) - 1 - depth] if params and depth < len(params) \
            else f"{module}.weight"
        if target not in base or lora_b is None:
            raise SnapshotMismatchError(f"snapshot {identity}: adapter module {module!r} has no "
                                        f"matching weight in the base model (or no lora_B)")
        weight = base[target]
        if weight.dim() == 3:  # an MoE layer's experts: a rank-r adapter per expert
            experts = weight.shape[0]
            a = lora_a.float().reshape(experts, -1, lora_a.shape[-1])   # e r in
            b = lora_b.float().reshape(lora_b.shape[0], -1, experts)    # out r e
            delta = torch.einsum("ore,eri->eoi", b, a)
            if delta.shape != weight.shape:  # experts stored [experts, in, out]
                delta = delta.transpose(1, 2)
        else:
            delta = lora_b.float() @ lora_a.float()
            if config.get("fan_in_fan_out"):  # GPT-2's Conv1D stores its weight as [in, out]
                delta = delta.T
        merged[target] = (weight.float() + scale * delta).to(weight.dtype)
    return merged


def _wrapped_parameters(base: Mapping[str, torch.Tensor],
                        target_parameters: list[str]) -> dict[str, list[str]]:
    """Module -> its weights named by peft ``target_parameters``, in registration order
    (the order of ``base``, a state dict)."""
    found: dict[str, list[str]] = {}
    for name in base:
        if any(name == t or name.endswith("." + t) for t in target_parameters):
            found.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return found


def _manifest_reference(store: CheckpointStore, entry_dir: str) -> str:
    with store.local_copy(entry_dir) as local:
        return read_delta_manifest(local).reference



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
        config["dtype"] = DTYPE_NAMES[floating.pop()]
        write_json(config_path, config)
    tokenizer.save_pretrained(directory)
    write_weights_manifest(directory, weights)


