"""Tinker's ``RestClient`` over the local store: training runs and their checkpoints.

A training run is a trainer job; its checkpoints are its train states (``checkpoint_type``
``"training"``, path ``tinker://<job>/weights/<name>``) and sampler snapshots (``"sampler"``,
``tinker://<job>/sampler_weights/<name>``). Answers are the ``tinker`` package's own types
(``TrainingRun``, ``Checkpoint``, ...) in completed futures, as ``tinker.RestClient`` returns
them; each method has an ``*_async`` twin returning the value.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from training.sdk.futures import APIFuture, async_twins, completed
from training.sdk.store import (
    CheckpointStore,
    EntryMeta,
    make_tinker_path,
    parse_tinker_path,
    validate_name,
)

__all__ = ["RestClient"]


def _time(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


@async_twins("get_training_run", "get_training_run_by_tinker_path", "list_training_runs",
             "list_checkpoints", "delete_checkpoint", "delete_checkpoint_from_tinker_path",
             "get_server_capabilities")
class RestClient:
    """Create it with :meth:`training.sdk.ServiceClient.create_rest_client`."""

    def __init__(self, store: CheckpointStore, capabilities: Any) -> None:
        self.store = store
        self._capabilities = capabilities

    def get_server_capabilities(self) -> APIFuture[Any]:
        """The models this service can train and sample (``GetServerCapabilitiesResponse``)."""
        return completed(self._capabilities())

    # ---------------------------------------------------------------- training runs
    def get_training_run(self, training_run_id: str) -> APIFuture[Any]:
        """One run (``TrainingRun``) with its latest train state and sampler checkpoint.

        Raises:
            JobNotFoundError: no such run in the store.
        """
        return completed(self._training_run(training_run_id))

    def get_training_run_by_tinker_path(self, tinker_path: str) -> APIFuture[Any]:
        """The run a ``tinker://<run>/...`` checkpoint path belongs to."""
        return completed(self._training_run(parse_tinker_path(tinker_path)[0]))

    def list_training_runs(self, limit: int = 20, offset: int = 0, *,
                           account: str | None = None) -> APIFuture[Any]:
        """Runs newest first, ``limit`` from ``offset`` (``TrainingRunsResponse`` with its
        ``cursor``); with ``account``, only that account's runs (a server tenant's)."""
        from tinker import types

        if limit < 1 or offset < 0:
            raise ValueError(f"limit must be >= 1 and offset >= 0, got limit={limit}, "
                             f"offset={offset}")
        jobs = sorted((job for job in (self.store.get_job(j) for j in self.store.list_jobs())
                       if account is None or job.account == account),
                      key=lambda job: job.created_at, reverse=True)
        page = [self._training_run(job.job_id) for job in jobs[offset:offset + limit]]
        return completed(types.TrainingRunsResponse(
            training_runs=page,
            cursor=types.Cursor(offset=offset, limit=limit, total_count=len(jobs))))

    def _training_run(self, job_id: str) -> Any:
        from tinker import types

        job = self.store.get_job(job_id)
        checkpoints = self._checkpoints(job_id)
        states = [c for c in checkpoints if c.checkpoint_type == "training"]
        samplers = [c for c in checkpoints if c.checkpoint_type == "sampler"]
        times = [job.created_at, *(c.time.timestamp() for c in checkpoints)]
        return types.TrainingRun(
            training_run_id=job.job_id, base_model=job.base_model, model_owner=job.account,
            is_lora=job.lora_rank > 0, lora_rank=job.lora_rank or None,
            last_request_time=_time(max(times)),
            last_checkpoint=states[-1] if states else None,
            last_sampler_checkpoint=samplers[-1] if samplers else None,
            user_metadata=dict(job.user_metadata) or None)

    # ---------------------------------------------------------------- checkpoints
    def list_checkpoints(self, training_run_id: str) -> APIFuture[Any]:
        """The run's train states and sampler snapshots, oldest first
        (``CheckpointsListResponse``); expired ones are left out."""
        from tinker import types

        self.store.get_job(training_run_id)  # an unknown run is an error, not an empty list
        return completed(types.CheckpointsListResponse(
            checkpoints=self._checkpoints(training_run_id)))

    def _checkpoints(self, job_id: str) -> list[Any]:
        rows = [self._checkpoint(meta, "state") for meta in self.store.list_states(job_id)
                if not meta.expired]
        rows += [self._checkpoint(meta, "sampler") for meta in self.store.list_samplers(job_id)
                 if not meta.expired]
        return sorted(rows, key=lambda c: c.time)

    def _checkpoint(self, meta: EntryMeta, kind: str) -> Any:
        from tinker import types

        path = make_tinker_path(meta.job_id or "", kind, meta.name)
        return types.Checkpoint(
            checkpoint_id=path.split("/", 3)[3], tinker_path=path,
            checkpoint_type="training" if kind == "state" else "sampler",
            time=_time(meta.created_at),
            user_metadata=meta.extra.get("user_metadata") or None,
            expires_at=_time(meta.expires_at) if meta.expires_at else None)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        """Delete ``checkpoint_id`` (``weights/<name>`` or ``sampler_weights/<name>``) of a run.

        Raises:
            CheckpointNotFoundError: the run has no such checkpoint.
        """
        return self.delete_checkpoint_from_tinker_path(
            f"tinker://{training_run_id}/{checkpoint_id}")

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Delete the checkpoint at ``tinker://<run>/<weights|sampler_weights>/<name>``."""
        job_id, kind, name = parse_tinker_path(tinker_path)
        validate_name(name)
        if kind == "state":
            self.store.get_state(job_id, name)
            self.store.delete(self.store.state_dir(job_id, name))
        else:
            self.store.get_sampler(job_id, name)
            self.store.delete(self.store.sampler_dir(job_id, name))
        return completed(None)
