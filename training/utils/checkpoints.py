"""Checkpoint kinds, ``{log_path}/checkpoints.jsonl`` and resume: the recipe-level checkpoint manager.

One row per completed save is appended to ``checkpoints.jsonl`` (never before the save is
complete), with the fields of the hosted cookbook::

    {"name": "step-10", "step": 10, "data_consumed": 40, "state_path": "cross_job://job/step-10",
     "source_job_id": "job", "base_model": "..."}

A rerun with the same ``log_path`` resumes from the last row that has a ``state_path``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.faults import fault_point
from training.sdk import distributed
from training.sdk.names import parse_checkpoint_ref, parse_model_name
from training.sdk.store import CheckpointStore, StoreError
from training.sdk.train_state import StateCorruptError
from training.sdk.training_client import TrainingClient
from training.utils.config import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINTS_FILE = "checkpoints.jsonl"
RUN_FILE = "run.json"


class CheckpointSaveError(StoreError):
    """A checkpoint could not be saved (disk full, read-only store, ...); nothing was recorded
    and earlier checkpoints are intact. The message names the checkpoint and what to do."""


class CheckpointLoadError(StoreError):
    """The checkpoint a resume needs cannot be loaded (corrupt or missing files); the message
    names it and the earlier checkpoint to fall back to."""


class CheckpointKind(str, enum.Enum):
    """What a cookbook checkpoint saves (seed: "Checkpoint kinds").

    STATE: DCP train state (weights + optimizer + run state): resumable, not promotable.
    SAMPLER: HF weights for inference: promotable, not resumable.
    BOTH: both: resumable and promotable (the final save of every recipe).
    """

    STATE = "state"
    SAMPLER = "sampler"
    BOTH = "both"

    @property
    def has_state(self) -> bool:
        return self in (CheckpointKind.STATE, CheckpointKind.BOTH)

    @property
    def has_sampler(self) -> bool:
        return self in (CheckpointKind.SAMPLER, CheckpointKind.BOTH)


@dataclass
class ResumeInfo:
    """Where a run continues from."""

    step: int
    """Optimizer steps already done."""
    data_consumed: int
    """Training examples already consumed (the data cursor)."""
    row: CheckpointRow | None = None
    """The checkpoints.jsonl row resumed from (None for init_from_checkpoint)."""
    user_state: dict[str, Any] = field(default_factory=dict)
    """Recipe state saved with the checkpoint (beyond step, data position and RNG)."""


def capture_rng_state() -> dict[str, Any]:
    """The python / numpy / torch RNG states, for exact resume."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointRow:
    """One line of ``checkpoints.jsonl``: a completed save of the run (tinker-cookbook's
    ``CheckpointRecord``).

    A recipe's row has ``name``, ``step``, ``data_consumed``, ``state_path`` (a train state to
    resume from) and/or ``sampler_path`` (a sampler snapshot to sample or promote),
    ``source_job_id`` and ``base_model``; resume and retention may mark it ``state_corrupt`` or
    ``state_deleted``. Keys it does not name (tinker-cookbook's rows, written through the
    trainer server, have ``batch`` instead of ``step``) are kept in :attr:`extra` and written
    back unchanged. ``row["name"]`` and ``row.get("sampler_path")`` still work for scripts
    written against the plain dict rows.
    """

    name: str = ""
    """The checkpoint's name (train state and snapshot are named after it)."""
    step: int | None = None
    """Optimizer steps done when it was saved."""
    data_consumed: int | None = None
    """Training examples consumed when it was saved (the data cursor)."""
    state_path: str | None = None
    """The train state (weights + optimizer + RNG): what a resume loads. None for a SAMPLER
    save, or once retention deleted it."""
    sampler_path: str | None = None
    """The sampler snapshot's name: what promotion and sampling use. None for a STATE save."""
    source_job_id: str | None = None
    """The trainer job that saved it (the store's namespace of both paths)."""
    base_model: str | None = None
    state_corrupt: bool = False
    """Its train state failed its checksums on load: never resumed from again."""
    state_deleted: str | None = None
    """Why its train state is gone (``keep_last_n``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other key of the line."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointRow:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the line (unset fields left out, as they were written)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra"}
        out = {k: v for k, v in out.items()
               if v is not None and not (k == "state_corrupt" and v is False)}
        return {**out, **self.extra}

    @property
    def resumable(self) -> bool:
        """It has a train state that may be resumed from."""
        return bool(self.state_path) and not self.state_corrupt

    @property
    def promotable(self) -> bool:
        """It has a sampler snapshot (promotion and sampling use it)."""
        return bool(self.sampler_path)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


def as_checkpoint_row(row: CheckpointRow | dict[str, Any]) -> CheckpointRow:
    return row if isinstance(row, CheckpointRow) else CheckpointRow.from_dict(row)


class CheckpointLog:
    """Reads and appends ``{log_path}/checkpoints.jsonl``.

    A crash during an append can leave a torn last line: it is ignored when reading (with a
    warning) and cut off before the next append. A bad line anywhere else is an error.
    """

    def __init__(self, log_path: str | os.PathLike[str]) -> None:
        self.log_path = Path(log_path)
        self.path = self.log_path / CHECKPOINTS_FILE

    def rows(self) -> list[CheckpointRow]:
        if not self.path.exists():
            return []
        rows, _ = self._parse()
        return rows

    def _parse(self) -> tuple[list[CheckpointRow], int]:
        """Rows and the byte length of the valid prefix of the file."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        rows: list[CheckpointRow] = []
        offset = 0
        for i, raw in enumerate(lines):
            is_last = i == len(lines) - 1
            if not raw.strip():
                offset += len(raw) + (0 if is_last else 1)
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if is_last or all(not rest.strip() for rest in lines[i + 1:]):
                    logger.warning("%s:%d is a torn line (a save was interrupted while writing "
                                   "it); ignoring it", self.path, i + 1)
                    return rows, offset
                raise ConfigError(f"{self.path}:{i + 1}: corrupt checkpoint row ({e}); fix or "
                                  f"delete that line") from e
            if not isinstance(row.get("name"), str):
                raise ConfigError(f"{self.path}:{i + 1}: a checkpoint row needs a 'name' (the "
                                  f"checkpoint's name), got {row.get('name')!r}; fix or delete "
                                  f"that line")
            if is_last:
                # A complete JSON object without its newline: the append died after the data.
                logger.warning("%s:%d lacks its newline; repairing", self.path, i + 1)
            rows.append(CheckpointRow.from_dict(row))
            offset += len(raw) + (0 if is_last else 1)
        return rows, offset

    def append(self, row: CheckpointRow | dict[str, Any]) -> None:
        """Append one row durably (fsync), after cutting off a torn tail left by a crash."""
        self.log_path.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _, valid = self._parse()
            size = self.path.stat().st_size
            with open(self.path, "r+b") as f:
                if valid < size:
                    f.truncate(valid)
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
        data = json.dumps(as_checkpoint_row(row).to_dict()).encode() + b"\n"
        with open(self.path, "ab") as f:
            # Test hook: die with half the row written, as a crash mid-append would.
            fault_point("checkpoints.append",
                        before_kill=lambda: (f.write(data[: len(data) // 2]), f.flush()))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, rows: Sequence[CheckpointRow | dict[str, Any]]) -> None:
        """Replace the whole file atomically (write a temp file, fsync, rename)."""
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(json.dumps(as_checkpoint_row(row).to_dict()).encode() + b"\n"
                             for row in rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def last_resumable(self) -> CheckpointRow | None:
        """The last row with a ``state_path`` not marked ``state_corrupt``, or None."""
        return next((row for row in reversed(self.rows()) if row.resumable), None)

    def latest_promotable(self, step: int | None = None) -> CheckpointRow | None:
        """The last row with a ``sampler_path`` (at ``step`` if given), or None."""
        return next((row for row in reversed(self.rows())
                     if row.promotable and (step is None or row.step == step)), None)


def check_run_identity(log_path: str | os.PathLike[str], identity: dict[str, Any],
                       resuming: bool, overrides: Sequence[str] = (),
                       ) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume a run whose settings changed; record the identity of a new run.

    ``identity`` holds what a resumed run must share with the original (base model, dataset
    fingerprint, batch size, learning rate, ...). A field named in ``overrides`` may change:
    the changes are returned (field -> (saved, new)) for :func:`record_identity_changes` to
    write once the resumed run has started, so a run that fails before that changes nothing.
    A fresh run (nothing to resume) overwrites ``run.json``. Fields the recorded identity lacks
    (a run.json of an older version) are not compared.

    Raises:
        ConfigError: a changed field not in ``overrides``, shown as a table of field, saved
            value and new value; or an override naming no identity field.
    """
    path = Path(log_path) / RUN_FILE
    unknown = sorted(set(overrides) - set(identity))
    if unknown:
        raise ConfigError(f"resume_overrides names {unknown}, which are not settings of this "
                          f"run's identity (those are: {', '.join(sorted(identity))})")
    if resuming and path.exists():
        recorded = read_run_identity(log_path)
        changed = {k: (recorded.get(k), v) for k, v in identity.items()
                   if k in recorded and recorded[k] != v}
        refused = {k: change for k, change in changed.items() if k not in overrides}
        if refused:
            width = max(len(k) for k in refused)
            table = "\n".join(f"  {k:<{width}}  saved {old!r:<24} new {new!r}"
                               for k, (old, new) in refused.items())
            raise ConfigError(
                f"{path}: this log_path holds a run with different settings:\n{table}\n"
                f"Resuming would silently mix them: restore the saved values, use a new "
                f"log_path, or, to change them on purpose from here on, rerun with "
                f"resume_overrides=[{','.join(refused)}].")
        return changed
    Path(log_path).mkdir(parents=True, exist_ok=True)
    _write_run_file(path, {**identity, "created_at": time.time()})
    return {}


def record_identity_changes(log_path: str | os.PathLike[str],
                            changes: dict[str, tuple[Any, Any]], from_step: int) -> None:
    """Make the allowed changes of :func:`check_run_identity` the run's identity, and append
    them to ``run.json``'s ``history`` (field, from, to, from_step, time)."""
    path = Path(log_path) / RUN_FILE
    recorded = read_run_identity(log_path)
    history = [*recorded.get("history", []),
               *({"field": k, "from": old, "to": new, "from_step": from_step,
                  "time": time.time()} for k, (old, new) in changes.items())]
    _write_run_file(path, {**recorded, **{k: new for k, (_, new) in changes.items()},
                           "history": history})


def _write_run_file(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_run_identity(log_path: str | os.PathLike[str]) -> dict[str, Any]:
    """``run.json`` of ``log_path`` ({} if there is none).

    Raises:
        ConfigError: it is not a JSON object (truncated or edited).
    """
    path = Path(log_path) / RUN_FILE
    if not path.exists():
        return {}
    try:
        recorded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        recorded = e
    if not isinstance(recorded, dict):
        raise ConfigError(f"{path} is damaged ({recorded}): it records the run's settings and "
                          f"trainer job. Restore it, or delete it to resume without the "
                          f"settings check (a fresh run writes a new one)")
    return recorded


def record_run_fields(log_path: str | os.PathLike[str], **values: Any) -> None:
    """Add facts about the run (trainer job id, total steps) to ``run.json``, atomically.

    They are not part of the identity: a resume does not compare them.
    """
    path = Path(log_path) / RUN_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**read_run_identity(log_path), **values}, indent=2,
                              sort_keys=True))
    os.replace(tmp, path)


class TrainingCheckpoints:
    """Saves, records and restores a recipe's checkpoints.

    Args:
        training_client: the policy's training client (its job owns the checkpoints).
        log_path: the run directory holding ``checkpoints.jsonl``.
    """

    def __init__(self, training_client: TrainingClient, log_path: str | os.PathLike[str]) -> None:
        self.client = training_client
        self.log = CheckpointLog(log_path)
        self._in_flight: list[tuple[Future[Any], dict[str, Any], CheckpointKind]] = []

    def save(self, name: str, *, step: int, data_consumed: int,
             kind: CheckpointKind | str = CheckpointKind.STATE,
             user_state: dict[str, Any] | None = None,
             promotable: bool | None = None,
             existing_state_path: str | None = None) -> CheckpointRow:
        """Save a checkpoint of ``kind`` and append its row once it is complete.

        ``promotable=True`` upgrades a STATE save to BOTH (the hosted cookbook's spelling).
        ``user_state`` is extra recipe state stored with the train state; step, data position
        and the RNG states are always stored (each rank's own under torchrun). ``existing_state_path``
        records an already saved train state of this very step instead of saving it again
        (re-saving a name first deletes it, which must never happen to the state a resume
        depends on).

        A STATE save on a client with ``async_saves`` returns as soon as the state is copied
        aside; its row is appended when the write has committed (see :meth:`poll`), so
        ``checkpoints.jsonl`` never names a checkpoint that is not complete. The returned row
        gets its ``state_path`` then. Rows are written by rank 0 alone.

        Raises:
            CheckpointSaveError: the store refused the save (disk full, read-only, ...). No row
                is appended and every earlier checkpoint is untouched.
        """
        kind = CheckpointKind(kind)
        if promotable and not kind.has_sampler:
            kind = CheckpointKind.BOTH
        # The client runs one save at a time anyway: finish (and record) the previous first,
        # so rows stay in step order.
        self.wait()
        row = CheckpointRow(name=name, step=step, data_consumed=data_consumed)
        try:
            if kind.has_state and existing_state_path is not None:
                row.state_path = existing_state_path
            elif kind.has_state:
                # A BOTH save waits for its state anyway: written in the call, it needs no
                # staging copy of weights and optimizer (1.75x the weights in fp32 with AdamW;
                # what can run a large model out of memory at its final save).
                waits = {"in_background": False} if kind.has_sampler and getattr(
                    self.client, "async_saves", False) else {}
                future = self.client.save_state(name, user_state={
                    "step": step, "data_consumed": data_consumed, "rng": capture_rng_state(),
                    "recipe": user_state or {}}, **waits)
                if not kind.has_sampler and not future.done():
                    self._in_flight.append((future, row, kind))
                    return row
                row.state_path = future.result().path
            if kind.has_sampler:
                row.sampler_path = self.client.save_weights_for_sampler_ext(
                    name, checkpoint_type="base").snapshot_name
            self._append(row)
        except (OSError, StoreError) as e:
            raise self._save_error(row, kind, e) from e
        logger.info("saved checkpoint %s (%s) at step %d", name, kind.value, step)
        return row

    def poll(self) -> int:
        """Append the rows of background saves that have committed, in save order; returns
        how many.

        Raises:
            CheckpointSaveError: a background save failed (nothing of it is recorded).
        """
        appended = 0
        while self._in_flight and self._in_flight[0][0].done():
            future, row, kind = self._in_flight.pop(0)
            try:
                row.state_path = future.result().path
                self._append(row)
            except (OSError, StoreError) as e:
                raise self._save_error(row, kind, e) from e
            logger.info("saved checkpoint %s (%s) at step %d", row.name, kind.value, row.step)
            appended += 1
        return appended

    def wait(self) -> int:
        """Wait for background saves and append their rows (see :meth:`poll`)."""
        for future, _row, _kind in list(self._in_flight):
            try:
                future.result()
            except BaseException:  # noqa: BLE001 (poll raises it with the full explanation)
                break
        return self.poll()

    def _append(self, row: CheckpointRow) -> None:
        row.source_job_id = self.client.job_id
        row.base_model = self.client.base_model
        if self.client.world.is_main:
            self.log.append(row)

    def _save_error(self, row: CheckpointRow, kind: CheckpointKind,
                    error: BaseException) -> CheckpointSaveError:
        last = self.log.last_resumable()
        resume = (f"rerun to resume from {last.name} (step {last.step})" if last
                  else "rerun to start again (no resumable checkpoint yet)")
        # A StoreError is the store's (the state or snapshot files); a bare OSError is the
        # append to checkpoints.jsonl, in log_path.
        where = (f"the store ({self.client.store.root_url})" if isinstance(error, StoreError)
                 else f"log_path ({self.log.path.parent})")
        return CheckpointSaveError(
            f"saving checkpoint {row.name!r} (step {row.step}, {kind.value}) of job "
            f"{self.client.job_id} failed: {error}. It was not recorded in {self.log.path}; "
            f"earlier checkpoints are intact. Free disk space on {where} or make it writable, "
            f"then {resume}.")

    save_checkpoint = save

    def resume(self, row: CheckpointRow | dict[str, Any] | None = None) -> ResumeInfo | None:
        """Restore weights, optimizer, step, data position and RNG from the last resumable row.

        Returns None when there is nothing to resume.
        """
        row = as_checkpoint_row(row) if row is not None else self.log.last_resumable()
        if row is None:
            return None
        try:
            loaded = self.client.load_state_with_optimizer(row.state_path).result()
        except StateCorruptError as e:
            # Never trained on: fall back to the newest intact checkpoint before it.
            earlier = [r for r in self.log.rows() if r.resumable and r.step < row.step]
            logger.warning("%s; falling back to %s", e,
                           f"{earlier[-1].name} (step {earlier[-1].step})" if earlier
                           else "the start of the run (no earlier checkpoint)")
            distributed.on_main(lambda: self._mark_corrupt(row))
            return self.resume(earlier[-1]) if earlier else ResumeInfo(step=0, data_consumed=0)
        except (StoreError, OSError) as e:
            earlier = [r for r in self.log.rows() if r.state_path and r.step < row.step]
            fallback = (f"to resume from the previous checkpoint {earlier[-1].name} (step "
                        f"{earlier[-1].step}), delete the rows after it from {self.log.path}"
                        if earlier else "no earlier checkpoint exists: start over with a new "
                        "log_path")
            raise CheckpointLoadError(
                f"cannot resume from checkpoint {row.name} (step {row.step}, "
                f"{row.state_path}) recorded in {self.log.path}: {e}. Nothing was changed; "
                f"{fallback}.") from e
        state = loaded.user_state
        if "rng" in state:
            restore_rng_state(state["rng"])
        return ResumeInfo(step=int(state.get("step", row.step)),
                          data_consumed=int(state.get("data_consumed", row.data_consumed)),
                          row=row, user_state=state.get("recipe", {}))

    def _mark_corrupt(self, row: CheckpointRow) -> None:
        """Keep the row (its sampler snapshot may be fine) but never resume from it again."""
        rows = self.log.rows()
        for r in rows:
            if (r.name, r.step) == (row.name, row.step):
                r.state_corrupt = True
        self.log.rewrite(rows)

    def apply_retention(self, keep_last_n: int | None,
                        protected: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete this job's older STATE-only checkpoints, keeping the newest ``keep_last_n``.

        Never deleted: the newest resumable checkpoint (what a resume needs), any row with a
        ``sampler_path`` (promotable), any checkpoint whose sampler snapshot was promoted to a
        model, and names in ``protected``. The rows stay in ``checkpoints.jsonl`` without their
        ``state_path`` (marked ``"state_deleted": "keep_last_n"``); the log is rewritten before
        the files go, so it never names a deleted checkpoint. Returns the deleted names.
        """
        if keep_last_n is None or not self.client.world.is_main:
            return []
        rows = self.log.rows()
        job_id = self.client.job_id
        state_only = [r for r in rows if r.state_path and not r.sampler_path
                      and r.source_job_id == job_id]
        keep = set(protected) | {r.name for r in rows if r.sampler_path}
        keep |= {r.name for r in state_only[max(len(state_only) - keep_last_n, 0):]}
        last = self.log.last_resumable()
        if last is not None:
            keep.add(last.name)
        keep |= _promoted_checkpoint_names(self.client.store, job_id)
        doomed = {r.name for r in state_only if r.name not in keep}
        if not doomed:
            return []
        for r in rows:
            if r.name in doomed and r.state_path and not r.sampler_path:
                r.state_path, r.state_deleted = None, "keep_last_n"
        self.log.rewrite(rows)
        for name in sorted(doomed):
            self.client.store.delete(self.client.store.state_dir(job_id, name))
        logger.info("retention (keep_last_n=%d) deleted %s", keep_last_n, ", ".join(doomed))
        return sorted(doomed)

    def init_from(self, checkpoint: str) -> ResumeInfo:
        """Load the weights of ``job_id:checkpoint_name`` to start a new run (step 0).

        The optimizer starts fresh: a new run has its own schedule and data order.
        """
        job_id, name = parse_checkpoint_ref(checkpoint)
        ref = self.client.resolve_checkpoint_path(name, source_job_id=job_id)
        self.client.load_state(ref).result()
        logger.info("initialized weights from %s", checkpoint)
        return ResumeInfo(step=0, data_consumed=0)

    def promote_latest(self, output_model_id: str, step: int | None = None) -> dict[str, Any]:
        """Promote the latest promotable row (or the one at ``step``) into a model."""
        return promote_from_log(self.log, self.client.store, output_model_id, step=step)


def _promoted_checkpoint_names(store: CheckpointStore, job_id: str) -> set[str]:
    """Checkpoint names of ``job_id`` whose sampler snapshots were promoted to a model.

    Snapshot names are ``<checkpoint name>-<8 hex session id>``; both forms are returned.
    """
    from training.sdk.registry import ModelRegistry

    names = set()
    for model in ModelRegistry(store).list_models():
        meta = store.read_meta(store.model_dir(*parse_model_name(model["name"])))
        if meta is not None and meta.extra.get("source_job_id") == job_id:
            snapshot = str(meta.extra.get("source_checkpoint_id", ""))
            names.update({snapshot, snapshot.rsplit("-", 1)[0]})
    return names


def promote_from_log(log: CheckpointLog, store: CheckpointStore, output_model_id: str, *,
                     step: int | None = None, account: str | None = None,
                     merge: bool = False) -> dict[str, Any]:
    """Promote the latest row of ``log`` with a ``sampler_path`` (or the one at ``step``).

    Idempotent: promoting the same checkpoint to the same id again returns the existing model,
    so a run killed during promotion just promotes again on rerun.
    """
    from training.sdk.registry import ModelRegistry

    row = log.latest_promotable(step)
    if row is None:
        raise ConfigError(f"{log.path} has no promotable checkpoint"
                          f"{f' at step {step}' if step is not None else ''}: save one with "
                          f"kind=SAMPLER or BOTH (the final checkpoint always is)")
    registry = ModelRegistry(store, account=account)
    return registry.promote_checkpoint(
        name=registry.checkpoint_name(row.source_job_id, row.sampler_path),
        output_model_id=output_model_id, base_model=row.base_model, merge=merge)
