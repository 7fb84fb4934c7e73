"""The service client: the entry point that creates trainer jobs on local compute."""

from __future__ import annotations

import logging

import torch

from training.sdk.models import load_causal_lm, load_tokenizer
from training.sdk.store import CheckpointStore
from training.sdk.training_client import TrainingClient, resolve_autocast_dtype, resolve_device

logger = logging.getLogger(__name__)


class ServiceClient:
    """Creates :class:`TrainingClient` jobs whose checkpoints live in one store.

    Args:
        storage_root: fsspec URL or path of the checkpoint store (default
            ``~/.cache/homefire/store``, or ``$HOMEFIRE_STORAGE_ROOT``).
        device: ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        mixed_precision: ``"auto"`` (bf16 autocast where the hardware is native), ``"bf16"``
            or ``"no"``. Master weights and optimizer state stay fp32 either way.
        account: the account segment of checkpoint and model names (default ``local``).
    """

    def __init__(self, storage_root: str | None = None, *, device: str = "auto",
                 mixed_precision: str = "auto", account: str | None = None) -> None:
        self.store = CheckpointStore(storage_root)
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_autocast_dtype(mixed_precision, self.device)
        self.account = account
        self._clients: dict[tuple, TrainingClient] = {}

    def create_training_client(self, base_model: str, lora_rank: int = 0,
                               user_metadata: dict[str, str] | None = None, *,
                               tokenizer_model: str | None = None,
                               job_id: str | None = None) -> TrainingClient:
        """A new trainer job for ``base_model`` (or, with ``job_id``, reattach to that job).

        Raises ValueError for a second client with the same ``(base_model, lora_rank)`` on this
        service: create a new ServiceClient for a separate trainer.
        """
        key = (base_model, lora_rank)
        if key in self._clients:
            raise ValueError(f"this ServiceClient already has a training client for "
                             f"base_model={base_model!r}, lora_rank={lora_rank}; create a new "
                             f"ServiceClient for a separate trainer")
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        if lora_rank > 0:
            raise ValueError("lora_rank > 0 (LoRA) is not available in this version; "
                             "use lora_rank=0 for full-parameter training")
        client = self._new_client(base_model, lora_rank, user_metadata, tokenizer_model,
                                  job_id=job_id, frozen=False)
        self._clients[key] = client
        return client

    def _new_client(self, base_model: str, lora_rank: int,
                    user_metadata: dict[str, str] | None, tokenizer_model: str | None,
                    job_id: str | None, frozen: bool) -> TrainingClient:
        if job_id is not None:
            job = self.store.get_job(job_id)
            if job.base_model != base_model or job.lora_rank != lora_rank:
                raise ValueError(f"job {job_id!r} trains base_model={job.base_model!r}, "
                                 f"lora_rank={job.lora_rank}; cannot reattach it for "
                                 f"base_model={base_model!r}, lora_rank={lora_rank}")
        tokenizer = load_tokenizer(tokenizer_model or base_model, self.store)
        model = load_causal_lm(base_model, self.store, dtype=torch.float32, device=self.device)
        if job_id is None:
            job = self.store.create_job(base_model, lora_rank, account=self.account,
                                        user_metadata=user_metadata)
        self.store.cleanup_expired(job.job_id)
        client = TrainingClient(store=self.store, job=job, model=model, tokenizer=tokenizer,
                                device=self.device, autocast_dtype=self.autocast_dtype,
                                frozen=frozen)
        logger.info("%s job %s: %s (%.2fM params) on %s", "reference" if frozen else "trainer",
                    job.job_id, base_model, client.num_parameters() / 1e6, self.device)
        return client

    def create_reference_client(self, base_model: str, lora_rank: int = 0,
                                user_metadata: dict[str, str] | None = None, *,
                                tokenizer_model: str | None = None) -> TrainingClient:
        """A frozen copy of ``base_model`` for reference logprobs (KL, DPO): ``forward`` only.

        It is a separate job with its own weights, so later policy updates never change it.
        """
        key = ("reference", base_model, lora_rank)
        if key in self._clients:
            return self._clients[key]
        client = self._new_client(base_model, lora_rank, user_metadata, tokenizer_model,
                                  job_id=None, frozen=True)
        self._clients[key] = client
        return client

    def create_base_training_client(self, base_model: str,
                                    user_metadata: dict[str, str] | None = None,
                                    ) -> TrainingClient:
        """A frozen base-model client for reference forward passes (see
        :meth:`create_reference_client`); never call forward_backward or optim_step on it."""
        return self.create_reference_client(base_model, 0, user_metadata)

    def close(self) -> None:
        self._clients.clear()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The hosted SDK's names, so ported scripts only change their imports.
FiretitanServiceClient = ServiceClient
