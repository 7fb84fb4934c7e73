"""``save_weights_for_sampler[_ext]`` of the training client: sampler snapshots as full
(``base``) weights or a delta against the previous snapshot of the session's chain (LoRA
sessions save the adapter). A mixin of :class:`~training.sdk.training_client.TrainingClient`;
the format is :mod:`training.sdk.snapshots`."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)

from training.sdk import distributed
from training.sdk.distributed import collective
from training.sdk.futures import completed
from training.sdk.hf_quiet import progress_bars_disabled
from training.sdk.lora import save_adapter
from training.sdk.snapshots import (
    DELTA_ENCODINGS,
    SnapshotType,
    encode_delta,
    make_snapshot_identity,
    sampler_weights,
    write_base_snapshot,
    write_weights_manifest,
)
from training.sdk.store import (
    EntryMeta,
    StoreError,
    validate_name,
)
from training.sdk.train_state import (  # StateCorruptError: its import path before the move
    StateCorruptError,  # noqa: F401
)
from training.sdk.types import (
    SaveSamplerResult,
)

logger = logging.getLogger(__name__)


class NonFiniteWeightsError(ValueError):
    """Weights with NaN or infinite values would be saved for inference or promoted."""


def check_finite_weights(weights: Any, what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first floating tensor of ``weights`` (a
    name -> tensor mapping) that holds a NaN or an infinity."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeightsError(
                f"{what}: tensor {name!r} has {bad} NaN/infinite values of {tensor.numel()}; "
                f"refusing to save weights no one can use. Resume from an earlier checkpoint "
                f"with a lower learning rate or gradient clipping")


_done = completed


class SamplerSaves:
    """Sampler snapshots of a training client (see the module docstring)."""

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 checkpoint_type: str | None = None,
                                 ) -> Future[SaveSamplerResult]:
        """Save the current weights for inference (HF format) as ``<name>-<session id>``."""
        return _done(self.save_weights_for_sampler_ext(name, checkpoint_type=checkpoint_type,
                                                       ttl_seconds=ttl_seconds))

    def save_weights_for_sampler_ext(self, name: str, checkpoint_type: str | None = None,
                                     ttl_seconds: int | None = None) -> SaveSamplerResult:
        """Like ``save_weights_for_sampler`` but returns the :class:`SaveSamplerResult` directly.

        ``checkpoint_type``:

        * ``"base"``: a Hugging Face directory (safetensors + config + tokenizer) that
          ``AutoModelForCausalLM.from_pretrained`` loads, typed ``INFERENCE_BASE``; promotable.
        * ``"delta"``: these weights' exact difference from the previous snapshot of this
          session's chain, per tensor ``new XOR reference`` (or the elements' moves in ulps with
          ``delta_encoding="ulp"``), zstd-compressed
          (``INFERENCE_ARC_V2``, see :mod:`training.sdk.snapshots`); ~10x smaller than a bf16
          base at small learning rates; not promotable.
        * ``None`` (default): ``"base"`` for the first snapshot of the session (or after
          :meth:`reset_sampler_chain`), ``"delta"`` after that.

        Weights are stored in :attr:`sampler_dtype`. ``ttl_seconds`` expires the snapshot (a
        delta whose chain lost a snapshot can still be hot-loaded onto a deployment that holds
        its reference, but no longer rebuilt from the store).

        Raises:
            ValueError: an unknown ``checkpoint_type``, or ``"delta"`` with no base saved yet in
                this session.
            StoreError: the snapshot could not be written.
        """
        if checkpoint_type is not None:
            checkpoint_type = SnapshotType.parse(checkpoint_type, "checkpoint_type")
        if self.job.lora_rank > 0:
            checkpoint_type = "base"  # adapters are small and standalone: no delta chain
        chain = self._sampler_chain
        resolved = checkpoint_type or ("delta" if chain is not None else "base")
        if resolved == "delta" and chain is None:
            raise ValueError(f"cannot save sampler snapshot {name!r} as a delta: job "
                             f"{self.job_id} has no base snapshot in this session to build the "
                             f"chain on; save one with checkpoint_type='base' first")
        snapshot_name = f"{validate_name(name)}-{self.session_id}"
        identity = make_snapshot_identity(self.job_id, snapshot_name)
        entry_dir = self.store.sampler_dir(self.job_id, snapshot_name)
        lora = self.job.lora_rank > 0
        # An adapter is saved as itself; only full-parameter snapshots need a weights copy.
        # Under torchrun the full weights are gathered to rank 0, which alone writes them.
        weights = self._adapter_weights() if lora else self._sampler_weights()
        if weights or not self.world.distributed:  # rank 0 checks what it will write
            check_finite_weights(weights or {n: p.detach() for n, p in
                                             self.model.named_parameters() if p.requires_grad},
                                 f"sampler snapshot {snapshot_name!r} of job {self.job_id}")
        extra: dict[str, Any] = {"step": self._step,
                                 "dtype": str(self.sampler_dtype).removeprefix("torch.")}

        def write() -> None:
            try:
                with self.store.staging_dir(entry_dir) as local, progress_bars_disabled():
                    if lora:
                        save_adapter(self.model, local, weights or None)
                        self.tokenizer.save_pretrained(local)
                        # Checksummed like a base: hotload and promotion verify the files.
                        write_weights_manifest(local, load_file(
                            os.path.join(local, "adapter_model.safetensors")))
                    elif resolved == "base":
                        write_base_snapshot(local, self.model, self.tokenizer, weights)
                    else:
                        stats = encode_delta(
                            weights, chain.weights, local, reference_identity=chain.identity,
                            encodings=DELTA_ENCODINGS[self.delta_encoding])
                        extra.update(reference=chain.identity,
                                     delta_bytes=stats.compressed_bytes,
                                     raw_bytes=stats.raw_bytes)
            except (OSError, SafetensorError) as e:
                # safetensors reports a full disk as its own error type, not an OSError.
                raise StoreError(f"saving sampler snapshot {snapshot_name!r} of job "
                                 f"{self.job_id} failed in {self.store.url(entry_dir)}: "
                                 f"{e}; nothing was saved. Free disk space or make the store "
                                 f"writable, then save again") from e
            now = time.time()
            self.store.commit(entry_dir, EntryMeta(
                kind="sampler", name=snapshot_name, job_id=self.job_id,
                base_model=self.base_model, created_at=now,
                expires_at=now + ttl_seconds if ttl_seconds else None,
                snapshot_type=self.store.infer_snapshot_type(entry_dir), extra=extra))

        distributed.on_main(write)
        if not lora:
            # Only a committed snapshot may become the reference of the next delta.
            self._sampler_chain = _SamplerChainHead(identity=identity, weights=weights)
        return SaveSamplerResult(path=identity, snapshot_name=snapshot_name)

    def _sampler_weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights in :attr:`sampler_dtype` (rank 0's are the full weights
        gathered from every rank; other ranks get an empty dict)."""
        if not self.world.distributed:
            return sampler_weights(self.model, self.sampler_dtype)
        with collective("gathering the weights for a sampler snapshot"):
            full = get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        if not self.world.is_main:
            return {}
        # Keep tied tensors once, under their first name, as the single-process path does.
        names = {name for name, _ in self.model.named_parameters()}
        names |= {name for name, _ in self.model.named_buffers()}
        return {k: (v.to(self.sampler_dtype) if v.is_floating_point() else v).contiguous()
                for k, v in full.items() if k in names}

    def _adapter_weights(self) -> dict[str, torch.Tensor]:
        """Under torchrun, the full trainable (adapter) weights gathered from every rank onto
        rank 0's CPU (other ranks get an empty dict); for one process, an empty dict: the
        adapter is saved straight from the model."""
        if not self.world.distributed:
            return {}
        with collective("gathering the adapter weights for a sampler snapshot"):
            full = get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        return full if self.world.is_main else {}

    @property
    def sampler_chain_head(self) -> str | None:
        """Identity of the snapshot the next delta will reference (None: the next is a base)."""
        return self._sampler_chain.identity if self._sampler_chain is not None else None

    def reset_sampler_chain(self) -> None:
        """Make the next default ``save_weights_for_sampler[_ext]`` a base snapshot."""
        self._sampler_chain = None


@dataclass
class _SamplerChainHead:
    """The last sampler snapshot of the session: the reference of the next delta."""

    identity: str
    weights: dict[str, torch.Tensor]
    """Its tensors exactly as stored (CPU, sampler dtype): one model's worth of memory."""


