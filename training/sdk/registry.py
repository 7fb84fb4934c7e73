"""The model registry: list a trainer job's checkpoints and promote sampler snapshots to models.

This is the local stand-in for the hosted control plane's checkpoint listing and
``promote_checkpoint``. Promotion is a metadata + file copy inside the checkpoint store: the
snapshot's Hugging Face files are copied to ``{root}/models/accounts/{account}/models/{id}/`` and
published with a ``meta.json`` (see :mod:`training.sdk.store` for the commit protocol). The
trainer job does not need to be running; its record only needs to exist in the store.

Names follow the hosted API:

* a checkpoint is ``accounts/<account>/rlorTrainerJobs/<job_id>/checkpoints/<checkpoint_id>``,
  where ``<checkpoint_id>`` is a train state name (``step-10``) or a sampler snapshot name
  (``step-50-a1b2c3d4``);
* a promoted model is ``accounts/<account>/models/<output_model_id>``, and
  :func:`training.sdk.models.load_causal_lm` accepts that name as a ``base_model``.

Only sampler snapshots typed ``INFERENCE_BASE`` or ``INFERENCE_LORA`` can be promoted. Train
states (DCP optimizer + weights) and ``INFERENCE_ARC_V2`` deltas are refused with an explanation
of how to save a promotable checkpoint instead.
"""

from __future__ import annotations

import shutil
import time
import warnings
from datetime import datetime, timezone
from typing import Any

from training.sdk.names import (  # importable from here as before
    MAX_MODEL_ID_LENGTH,
    checkpoint_resource_name,
    model_resource_name,
    parse_checkpoint_resource_name,
    parse_model_name,
    validate_output_model_id,
)
from training.sdk.store import (
    META_FILE,
    PROMOTABLE_SNAPSHOT_TYPES,
    CheckpointNotFoundError,
    CheckpointStore,
    EntryMeta,
    JobNotFoundError,
    JobRecord,
    StoreError,
    default_account,
    validate_name,
)

__all__ = [
    "MAX_MODEL_ID_LENGTH", "TRAINING_STATE", "BaseModelMismatchError", "CheckpointNotFoundError",
    "FireworksClient", "InvalidModelIdError", "JobNotFoundError", "ModelExistsError",
    "ModelNotFoundError", "ModelRegistry", "NotPromotableError", "PromotionWriteError", "RegistryError",
    "validate_output_model_id",
]

TRAINING_STATE = "TRAINING_STATE"
"""``checkpointType`` of a train state (DCP) in :meth:`ModelRegistry.list_checkpoints` rows."""


_LEGACY_FORM_WARNING = (
    "promote_checkpoint(job_id, checkpoint_id, ...) positional form is deprecated. Pass the "
    "4-segment resource name instead: promote_checkpoint(name=entry['name'], "
    "output_model_id=..., base_model=...). The 'name' field comes straight from "
    "list_checkpoints output.")
_HOT_LOAD_WARNING = (
    "promote_checkpoint(hot_load_deployment_id=...) is deprecated and ignored. The local "
    "registry copies the snapshot straight from the checkpoint store, so no deployment is "
    "involved in a promotion. Omit this argument.")


class RegistryError(Exception):
    """Base class of model registry errors."""


class InvalidModelIdError(RegistryError, ValueError):
    """``output_model_id`` breaks the model id rules (see :func:`validate_output_model_id`)."""


class PromotionWriteError(RegistryError, OSError):
    """The promoted model could not be written (full or read-only store); the message names
    the model, the path and the cause. Nothing is half-promoted."""


class NotPromotableError(RegistryError, ValueError):
    """The checkpoint exists but cannot become a model (a train state or a delta snapshot)."""


class ModelExistsError(RegistryError, ValueError):
    """``output_model_id`` is already taken by a model promoted from another checkpoint."""


class BaseModelMismatchError(RegistryError, ValueError):
    """``base_model`` given to ``promote_checkpoint`` is not the one the checkpoint was trained from."""


class ModelNotFoundError(RegistryError, KeyError):
    """No promoted model of that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _rfc3339(timestamp: float) -> str:
    """``2025-01-31T12:34:56.789012Z``: the hosted API's timestamp format (UTC)."""
    return (datetime.fromtimestamp(timestamp, tz=timezone.utc)
            .isoformat(timespec="microseconds").replace("+00:00", "Z"))


class ModelRegistry:
    """Checkpoint listing and promotion over a :class:`CheckpointStore`.

    Args:
        store: the checkpoint store, or its fsspec URL / path (default: the default store,
            ``$HOMEFIRE_STORAGE_ROOT`` or ``~/.cache/homefire/store``). Use the trainer's
            ``InfraConfig.storage_root``.
        account: the account that owns promoted models. By default a promoted model goes to its
            source job's account, and bare model ids in :meth:`get_model` resolve in
            ``$HOMEFIRE_ACCOUNT`` (else ``local``).
        api_key, base_url: accepted and ignored, so ``FireworksClient(api_key=...)`` from a
            script written for the hosted service runs unchanged; the local registry needs no
            credentials and talks to no server.
    """

    def __init__(self, store: CheckpointStore | str | None = None, account: str | None = None,
                 *, api_key: str | None = None, base_url: str | None = None) -> None:
        del api_key, base_url  # accepted for source compatibility with the hosted SDK only
        if isinstance(store, CheckpointStore) or store is None:
            self.store = store if store is not None else CheckpointStore()
        else:
            # A registry opens an existing store and never creates one: FireworksClient(key)
            # with the API key given positionally must not make a directory named after it.
            try:
                self.store = CheckpointStore(store, create=False)
            except StoreError as e:
                raise StoreError(f"{e}. ModelRegistry / FireworksClient's first argument is the "
                                 f"checkpoint store; an API key goes in api_key=... (it is "
                                 f"ignored locally)") from None
        self.account = validate_name(account, "account") if account is not None else None

    def __repr__(self) -> str:
        return f"ModelRegistry({self.store.root_url!r}, account={self.account!r})"

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_name(self, job_id: str, checkpoint_id: str) -> str:
        """The 4-segment resource name of a job's checkpoint (the account is the job's).

        Raises:
            JobNotFoundError: no job ``job_id`` in the store.
        """
        validate_name(job_id, "job id")
        validate_name(checkpoint_id, "checkpoint id")
        job = self.store.get_job(job_id)
        return checkpoint_resource_name(job.account, job_id, checkpoint_id)

    def list_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """The job's committed, unexpired train states and sampler snapshots, newest first.

        Each row has the hosted API's fields: ``name`` (the 4-segment resource name to pass to
        :meth:`promote_checkpoint`), ``createTime`` and ``updateTime`` (RFC 3339, UTC; equal,
        because committed entries are immutable), ``checkpointType`` (``TRAINING_STATE`` for a
        DCP train state, else the snapshot type ``INFERENCE_BASE`` / ``INFERENCE_LORA`` /
        ``INFERENCE_ARC_V2``) and ``promotable``.

        Raises:
            JobNotFoundError: no job ``job_id`` in the store.
        """
        job = self.store.get_job(job_id)
        entries = [*self.store.list_states(job_id), *self.store.list_samplers(job_id)]
        entries.sort(key=lambda m: (m.created_at, m.name), reverse=True)
        rows = []
        for meta in entries:
            checkpoint_type = _checkpoint_type(meta)
            rows.append({
                "name": checkpoint_resource_name(job.account, job_id, meta.name),
                "createTime": _rfc3339(meta.created_at),
                "updateTime": _rfc3339(meta.created_at),
                "checkpointType": checkpoint_type,
                "promotable": checkpoint_type in PROMOTABLE_SNAPSHOT_TYPES,
            })
        return rows

    # ---------------------------------------------------------------- promotion
    def promote_checkpoint(self, name: str | None = None, output_model_id: str | None = None,
                           base_model: str | None = None, *legacy_args: str,
                           job_id: str | None = None, checkpoint_id: str | None = None,
                           hot_load_deployment_id: str | None = None,
                           merge: bool = False) -> dict[str, Any]:
        """Promote a sampler snapshot to the model ``accounts/<account>/models/<output_model_id>``.

        A LoRA snapshot (``INFERENCE_LORA``) becomes an adapter directory that
        ``PeftModel.from_pretrained(base, path)`` loads; with ``merge=True`` the adapter is merged
        into its base and the model is a plain transformers directory instead.

        Preferred form: ``promote_checkpoint(name=row["name"], output_model_id=...,
        base_model=...)`` with a row of :meth:`list_checkpoints`. The legacy form
        ``promote_checkpoint(job_id, checkpoint_id, output_model_id, base_model)`` (positional or
        keywords) still works and emits a ``DeprecationWarning``.

        Promoting is idempotent: if ``output_model_id`` already holds a model promoted from the
        same checkpoint, its record is returned unchanged, so a run killed mid-promotion can
        simply call again (a half-copied model directory is replaced).

        Args:
            name: the checkpoint's 4-segment resource name.
            output_model_id: the new model's id (see :func:`validate_output_model_id`); it is
                checked before anything else happens.
            base_model: the base model the checkpoint was trained from; a check, not a choice:
                it must equal the trainer job's base model. Default: the job's.
            job_id, checkpoint_id: legacy way to name the checkpoint.
            hot_load_deployment_id: deprecated and ignored.

        Returns:
            The model's record: ``name``, ``path`` (a local directory that
            ``AutoModelForCausalLM.from_pretrained`` loads; a URL for remote stores),
            ``base_model``, ``source_checkpoint`` (4-segment name), ``checkpointType`` and
            ``createTime``.

        Raises:
            InvalidModelIdError: ``output_model_id`` breaks the id rules.
            JobNotFoundError, CheckpointNotFoundError: no such job or checkpoint.
            NotPromotableError: the checkpoint is a train state or a delta snapshot.
            BaseModelMismatchError: ``base_model`` is not the job's base model.
            ModelExistsError: ``output_model_id`` was promoted from another checkpoint.
        """
        checkpoint, output_model_id, base_model, legacy = _normalize_promote_args(
            name, output_model_id, base_model, legacy_args, job_id, checkpoint_id)
        if legacy:
            warnings.warn(_LEGACY_FORM_WARNING, DeprecationWarning, stacklevel=2)
        if hot_load_deployment_id is not None:
            warnings.warn(_HOT_LOAD_WARNING, DeprecationWarning, stacklevel=2)
        if output_model_id is None:
            raise TypeError("promote_checkpoint() needs output_model_id, the id of the model "
                            "to create")
        # The id is checked before any store access so that a bad id never leaves files behind.
        problems = validate_output_model_id(output_model_id)
        if problems:
            raise InvalidModelIdError(f"cannot promote to output_model_id "
                                      f"{output_model_id!r}: {'; '.join(problems)}")

        if isinstance(checkpoint, tuple):
            name = self.checkpoint_name(*checkpoint)
        else:
            name = checkpoint
        job, snapshot = self._resolve_promotable(name)
        if base_model is not None and base_model != job.base_model:
            raise BaseModelMismatchError(
                f"base_model {base_model!r} does not match checkpoint {name}, which trainer job "
                f"{job.job_id!r} trained from base_model {job.base_model!r}; pass "
                f"base_model={job.base_model!r} or omit it")

        account = self.account or job.account
        model_dir = self.store.model_dir(account, output_model_id)
        existing = self.store.read_meta(model_dir)
        if existing is not None:
            existing_source = existing.extra.get("source_checkpoint", "an unknown checkpoint")
            if (existing.extra.get("source_job_id") == job.job_id
                    and existing.extra.get("source_checkpoint_id") == snapshot.name):
                return self._model_record(account, existing)
            raise ModelExistsError(
                f"model {model_resource_name(account, output_model_id)} already exists, "
                f"promoted from {existing_source}, not from {name}; choose another "
                f"output_model_id, or delete {self.store.url(model_dir)} to replace it")

        if merge and snapshot.snapshot_type != "INFERENCE_LORA":
            raise NotPromotableError(f"merge=True applies to LoRA adapters; {name} is a "
                                     f"{snapshot.snapshot_type} snapshot (already full weights)")
        source_dir = self.store.sampler_dir(job.job_id, snapshot.name)
        # staging_dir removes a half-copied directory left by an interrupted promotion.
        try:
            with self.store.staging_dir(model_dir) as staging:
                if merge:
                    self._merge_adapter(job, source_dir, staging)
                else:
                    self._copy_snapshot_files(source_dir, staging)
                _check_promoted_files(staging, f"promoting {name}")
        except (OSError, shutil.Error) as e:  # full or read-only store: nothing was committed
            raise PromotionWriteError(
                f"promoting {name} to {model_resource_name(account, output_model_id)} failed "
                f"writing {self.store.url(model_dir)}: {_first_os_error(e)}. Nothing was "
                f"promoted and the checkpoint is intact: free space on (or make writable) the "
                f"store and promote again (a recipe's rerun does)") from e
        now = time.time()
        model_type = "INFERENCE_BASE" if merge else snapshot.snapshot_type
        meta = EntryMeta(
            kind="model", name=output_model_id, job_id=job.job_id, base_model=job.base_model,
            created_at=now, snapshot_type=model_type,
            extra={"source_job_id": job.job_id, "source_checkpoint_id": snapshot.name,
                   "source_checkpoint": name, "snapshot_type": snapshot.snapshot_type,
                   "base_model": job.base_model, "promoted_at": _rfc3339(now),
                   "step": snapshot.extra.get("step"), "merged": merge})
        self.store.commit(model_dir, meta)
        return self._model_record(account, meta)

    def _merge_adapter(self, job: JobRecord, adapter_dir: str, out_dir: str) -> None:
        """Write base + adapter merged into one plain model (with the adapter's tokenizer)."""
        from transformers import AutoTokenizer

        from training.sdk.lora import merge_adapter
        from training.sdk.models import model_source
        from training.sdk.snapshots import verify_snapshot_files

        with model_source(job.base_model, self.store) as base, \
                self.store.local_copy(adapter_dir) as adapter:
            verify_snapshot_files(adapter, f"adapter {adapter_dir}")  # before merging it
            merge_adapter(base, adapter, out_dir)
            AutoTokenizer.from_pretrained(adapter).save_pretrained(out_dir)

    def _resolve_promotable(self, name: str) -> tuple[JobRecord, EntryMeta]:
        """The job and sampler snapshot that ``name`` denotes, refusing what cannot be promoted."""
        account, job_id, checkpoint_id = parse_checkpoint_resource_name(name)
        job = self.store.get_job(job_id)
        if account != job.account:
            raise CheckpointNotFoundError(
                f"checkpoint {name}: trainer job {job_id!r} belongs to account "
                f"{job.account!r}, not {account!r}; use the name from list_checkpoints({job_id!r})")
        # A sampler snapshot wins over a train state of the same name: it is the promotable one.
        snapshot = self.store.read_meta(self.store.sampler_dir(job_id, checkpoint_id))
        if snapshot is not None and not snapshot.expired:
            snapshot_type = snapshot.snapshot_type
            if snapshot_type == "INFERENCE_ARC_V2":
                raise NotPromotableError(
                    f"checkpoint {name} is a delta snapshot (INFERENCE_ARC_V2): a diff over "
                    f"an earlier base snapshot, which cannot be promoted on its own. Save a "
                    f"'base' snapshot and promote that: save_checkpoint(kind=SAMPLER or BOTH) in "
                    f"a recipe, or save_weights_for_sampler_ext(name, checkpoint_type='base')")
            if snapshot_type not in PROMOTABLE_SNAPSHOT_TYPES:
                raise NotPromotableError(
                    f"checkpoint {name} has snapshot type {snapshot_type!r}; only "
                    f"{' and '.join(PROMOTABLE_SNAPSHOT_TYPES)} snapshots can be promoted")
            return job, snapshot
        state = self.store.read_meta(self.store.state_dir(job_id, checkpoint_id))
        if state is not None and not state.expired:
            raise NotPromotableError(
                f"checkpoint {name} is a STATE checkpoint: it holds DCP (optimizer + weights) "
                f"for resuming only, not HF weights for inference, so it is not promotable. To "
                f"promote a mid-training checkpoint, call save_checkpoint explicitly with "
                f"kind=SAMPLER or kind=BOTH (the final checkpoint always uses BOTH), or, with "
                f"the raw SDK, save_weights_for_sampler_ext(name, checkpoint_type='base')")
        rows = self.list_checkpoints(job_id)
        promotable = [r["name"].rsplit("/", 1)[-1] for r in rows if r["promotable"]]
        others = [r["name"].rsplit("/", 1)[-1] for r in rows if not r["promotable"]]
        expired = " (it expired)" if snapshot is not None or state is not None else ""
        raise CheckpointNotFoundError(
            f"trainer job {job_id!r} has no checkpoint {checkpoint_id!r}{expired}; promotable "
            f"snapshots: {', '.join(promotable) or 'none'}; other checkpoints: "
            f"{', '.join(others) or 'none'}")

    def _copy_snapshot_files(self, source_dir: str, staging: str) -> None:
        if self.store.is_local:
            self.store.copy_dir(source_dir, staging)
            return
        # A remote store stages in a local temp dir, so the files make a round trip here.
        with self.store.local_copy(source_dir) as fetched:
            shutil.copytree(fetched, staging, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(META_FILE))

    # ---------------------------------------------------------------- models
    def get_model(self, model_name: str) -> dict[str, Any]:
        """The record of a promoted model: ``accounts/<account>/models/<id>`` or a bare ``<id>``.

        A bare id resolves in this registry's account (default ``$HOMEFIRE_ACCOUNT``, else
        ``local``).

        Raises:
            ModelNotFoundError: no such promoted model.
        """
        account, model_id = self._parse_model_name(model_name)
        meta = self.store.read_meta(self.store.model_dir(account, model_id))
        if meta is None or meta.kind != "model":
            known = ", ".join(m["name"] for m in self.list_models()[:10]) or "none"
            raise ModelNotFoundError(
                f"no promoted model {model_resource_name(account, model_id)} in the store "
                f"{self.store.root_url} (models: {known}); promote one with "
                f"promote_checkpoint or check the storage root")
        return self._model_record(account, meta)

    def model_path(self, model_name: str) -> str:
        """Where the promoted model's files are: a directory ``from_pretrained`` loads (local)."""
        return self.get_model(model_name)["path"]

    def list_models(self) -> list[dict[str, Any]]:
        """Promoted models, newest first: this registry's account if one was given, else all."""
        base = "/".join([self.store.root, "models", "accounts"])
        if not self.store.fs.exists(base):
            return []
        accounts = ([self.account] if self.account is not None else
                    [p.rstrip("/").rsplit("/", 1)[-1]
                     for p in self.store.fs.ls(base, detail=False)])
        found: list[tuple[str, EntryMeta]] = []
        for account in accounts:
            parent = "/".join([base, account, "models"])
            if not self.store.fs.exists(parent):
                continue
            for path in self.store.fs.ls(parent, detail=False):
                meta = self.store.read_meta(path.rstrip("/"))
                if meta is not None and meta.kind == "model":
                    found.append((account, meta))
        found.sort(key=lambda item: (item[1].created_at, item[1].name), reverse=True)
        return [self._model_record(account, meta) for account, meta in found]

    def _parse_model_name(self, model_name: str) -> tuple[str, str]:
        parsed = parse_model_name(model_name)
        if parsed is not None:
            account, model_id = parsed
        elif isinstance(model_name, str) and "/" not in model_name:
            account, model_id = self.account or default_account(), model_name
        else:
            raise ValueError(f"model name {model_name!r} is neither 'accounts/<account>/models/"
                             f"<id>' nor a bare model id")
        validate_name(account, "account")
        validate_name(model_id, "model id")
        return account, model_id

    def _model_record(self, account: str, meta: EntryMeta) -> dict[str, Any]:
        return {
            "name": model_resource_name(account, meta.name),
            "path": self.store.url(self.store.model_dir(account, meta.name)),
            "base_model": meta.base_model,
            "source_checkpoint": meta.extra.get("source_checkpoint"),
            "checkpointType": meta.snapshot_type,
            "createTime": _rfc3339(meta.created_at),
        }


FireworksClient = ModelRegistry
"""The hosted SDK's name; ``FireworksClient(api_key=...)`` ignores the key (see ModelRegistry)."""


def _checkpoint_type(meta: EntryMeta) -> str:
    if meta.kind == "state":
        return TRAINING_STATE
    return meta.snapshot_type or "INFERENCE_BASE"


def _normalize_promote_args(name: str | None, output_model_id: str | None,
                            base_model: str | None, legacy_args: tuple[str, ...],
                            job_id: str | None, checkpoint_id: str | None,
                            ) -> tuple[str | tuple[str, str], str | None, str | None, bool]:
    """Map both call forms to ``(checkpoint, output_model_id, base_model, used_legacy_form)``.

    ``checkpoint`` is the 4-segment name, or ``(job_id, checkpoint_id)`` for the legacy form.
    Nothing is validated here: the caller checks ``output_model_id`` first. A legacy positional
    call ``(job_id, checkpoint_id, output_model_id, base_model)`` lands one slot to the left of
    the preferred signature; a job id never contains '/' and a resource name always does, which
    tells the two apart.
    """
    if name is not None and "/" in name:
        if legacy_args:
            raise TypeError("promote_checkpoint() takes at most 3 positional arguments "
                            "(name, output_model_id, base_model) in the name= form")
        if job_id is not None or checkpoint_id is not None:
            raise TypeError("promote_checkpoint() takes either name= or (job_id, "
                            "checkpoint_id), not both")
        return name, output_model_id, base_model, False
    if name is not None:  # the legacy positional form
        if job_id is not None:
            raise TypeError("promote_checkpoint() got the job id both positionally and as "
                            "job_id=")
        job_id = name
        if checkpoint_id is None:
            if len(legacy_args) > 1:
                raise TypeError(f"promote_checkpoint() takes at most 4 positional arguments "
                                f"(job_id, checkpoint_id, output_model_id, base_model), got "
                                f"{3 + len(legacy_args)}")
            checkpoint_id, output_model_id, base_model = (
                output_model_id, base_model, legacy_args[0] if legacy_args else None)
        elif legacy_args:
            raise TypeError("promote_checkpoint() got too many positional arguments")
    if job_id is None or checkpoint_id is None:
        raise TypeError("promote_checkpoint() needs name= (the 4-segment checkpoint name from "
                        "list_checkpoints), or the deprecated job_id= and checkpoint_id=")
    return (job_id, checkpoint_id), output_model_id, base_model, True


def _first_os_error(error: BaseException) -> str:
    """The cause of a failed write in one line (``shutil.copytree`` gathers one error per
    file into a list of ``(source, destination, reason)``)."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) \
            and error.args[0]:
        reason = str(error.args[0][0][-1])
        return reason.split(": '", 1)[0]  # "[Errno 28] No space left on device"
    if isinstance(error, OSError) and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error)


def _check_promoted_files(directory: str, what: str) -> None:
    """Refuse corrupt weights (files that fail the checksums taken when the snapshot was
    saved) and weights with NaN or infinite values (a model trained to NaN must not be
    promoted): every tensor of every ``.safetensors`` file in ``directory`` is checked."""
    from training.sdk.snapshots import verify_snapshot_files
    from training.sdk.training_client import check_finite_weights

    check_finite_weights(verify_snapshot_files(directory, what), what)
