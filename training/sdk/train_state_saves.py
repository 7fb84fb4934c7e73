"""``save_state`` / ``load_state[_with_optimizer]`` of the training client: train states
written synchronously or in the background (staged copy, one in flight) and loaded after their
checksums pass. A mixin of :class:`~training.sdk.training_client.TrainingClient`; the on-disk
format is :mod:`training.sdk.train_state`."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from concurrent.futures import Future
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from training.sdk import distributed
from training.sdk.futures import completed
from training.sdk.loss_scaling import DynamicLossScale
from training.sdk.models import own_weights
from training.sdk.store import (
    EntryMeta,
    StoreError,
    make_cross_job_ref,
    parse_checkpoint_ref,
    validate_name,
)
from training.sdk.train_state import (  # StateCorruptError: its import path before the move
    StateCorruptError,  # noqa: F401
    dcp_call,
    train_state_dict,
    user_state_key,
    verify_state_checksums,
    write_state_checksums,
)
from training.sdk.types import (
    LoadStateResponse,
    SaveStateResponse,
)

logger = logging.getLogger(__name__)


_done = completed


class TrainStateSaves:
    """Train-state saves and loads of a training client (see the module docstring)."""

    def save_state(self, name: str, ttl_seconds: int | None = None, timeout: float | None = None,
                   user_state: dict[str, Any] | None = None, *,
                   user_metadata: dict[str, str] | None = None,
                   overwrite: bool | None = None,
                   in_background: bool | None = None) -> Future[SaveStateResponse]:
        """Save weights + optimizer (+ ``user_state``) as a DCP checkpoint named ``name``.

        ``user_metadata`` (Tinker's) is a dict of strings kept with the checkpoint
        (``create_rest_client().list_checkpoints`` shows it). ``overwrite=False`` refuses a name
        that already has a committed train state; the default (``None``) replaces it, as
        ``True`` does (a recipe re-saves the step it resumed at).

        ``user_state`` (a local extension) is any picklable dict stored inside the same DCP
        checkpoint, e.g. step, data position, RNG states; ``load_state*`` returns it (each rank
        gets its own under torchrun). Gradients accumulated since the last ``optim_step`` are not
        saved. ``timeout`` is accepted for API compatibility.

        With :attr:`async_saves` (or ``in_background=True``; ``False`` writes in the call, with
        no staging copy of the state) the call returns at once: a background thread copies the
        state aside (while the next forward/backward, which only reads the weights, runs; the
        next ``optim_step`` waits for that copy) and then writes the files; the future
        completes when the checkpoint is committed (its ``meta.json`` written), and carries the
        error if the write failed. Until then the checkpoint does not exist for any reader. At
        most one save is in flight: the next save, a load, or :meth:`wait_for_saves` waits.
        """
        validate_name(name)
        if user_metadata is not None and not (isinstance(user_metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in user_metadata.items())):
            raise TypeError(f"user_metadata must be a dict of strings to strings, got "
                            f"{user_metadata!r}")
        called = time.perf_counter()
        self.wait_for_saves()
        if overwrite is False and self._has_state(name):
            raise StoreError(f"train state {name!r} of job {self.job_id} already exists; pass "
                             f"overwrite=True to replace it, or choose another name")
        state: dict[str, Any] = {
            **self._live_state_dicts(),
            "trainer": {"step": self._step},
            user_state_key(self.world.rank): pickle.dumps(user_state or {}),
        }
        entry_dir = self.store.state_dir(self.job_id, name)
        now = time.time()
        meta = EntryMeta(kind="state", name=name, job_id=self.job_id, base_model=self.base_model,
                         created_at=now, expires_at=now + ttl_seconds if ttl_seconds else None,
                         extra={"step": self._step, "has_optimizer": self._optimizer is not None,
                                "world_size": self.world.world_size,
                                **(self.loss_scale.state() if self.loss_scale else {}),
                                **({"user_metadata": dict(user_metadata)}
                                   if user_metadata else {})})
        response = SaveStateResponse(path=make_cross_job_ref(self.job_id, name), name=name,
                                     job_id=self.job_id)
        what = f"saving train state {name!r}"
        # Every rank writes its shards into the one entry: rank 0 clears a stale leftover first.
        try:
            distributed.on_main(lambda: self.store.clear_entry(entry_dir))
            local = self.store.open_entry(entry_dir)
        except OSError as e:  # the store's directories cannot be made (full, read-only)
            raise StoreError(f"{what} failed in {self.store.url(entry_dir)}: "
                             f"{type(e).__name__}: {e}") from e
        # Ranks of a remote store each upload their own files; only a barrier tells rank 0 that
        # all uploads are done, so those saves stay synchronous.
        background = self.async_saves if in_background is None else in_background
        if not background or (self.world.distributed and not self.store.is_local):
            try:
                dcp_call(dcp.save, state, local, what)
                write_state_checksums(local, self.world.rank)
                self.store.close_entry(entry_dir, local)
            except BaseException:
                self.store.abort_entry(entry_dir, local)
                raise
            distributed.barrier()
            distributed.on_main(lambda: self.store.commit(entry_dir, meta))
            return _done(response)

        future: Future[SaveStateResponse] = Future()
        staged = threading.Event()
        process_group = distributed.checkpoint_group()  # created here: a collective itself

        def write_in_background() -> None:
            try:
                # The copy runs while the caller's next forward/backward only reads the weights;
                # optim_step (the first thing that changes them) waits for it.
                try:
                    copy = self._staging.copy(state)
                finally:
                    staged.set()
                dcp_call(dcp.save, copy, local, what, process_group)
                write_state_checksums(local, self.world.rank)
                self.store.close_entry(entry_dir, local)
                if self.world.is_main:  # rank 0's save ends after every rank's shards
                    self.store.commit(entry_dir, meta)
                future.set_result(response)
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits on the future)
                self.store.abort_entry(entry_dir, local)
                future.set_exception(e if isinstance(e, StoreError) else StoreError(
                    f"{what} failed in {self.store.url(entry_dir)}: {type(e).__name__}: {e}"))

        self._staged = staged
        threading.Thread(target=write_in_background, name=f"homefire-save-{name}").start()
        self._pending_saves.append(future)
        self.save_stall_s += time.perf_counter() - called
        return future

    def _has_state(self, name: str) -> bool:
        try:
            self.store.get_state(self.job_id, name)
        except StoreError:
            return False
        return True

    def _wait_for_staging(self) -> None:
        """Block until a background save has copied the state aside (before weights change)."""
        if self._staged is not None:
            waited = time.perf_counter()
            self._staged.wait()
            self.save_stall_s += time.perf_counter() - waited
            self._staged = None

    def _live_state_dicts(self) -> dict[str, Any]:
        """The model (and optimizer) state dicts of a train state: views of the live tensors.

        Building them maps every parameter to its name (~12 ms for 10M params). The tensors
        they hold are the live parameters and optimizer moments, which stay the same objects
        from step to step, so the dicts are built once per optimizer (and once its moments
        exist) and reused; only the optimizer's hyper-parameters, plain numbers copied into
        ``param_groups``, are refreshed each time.
        """
        optimizer = self._optimizer
        key = (id(optimizer), len(optimizer.state) if optimizer is not None else 0)
        if self._state_dicts_key != key:
            dicts: dict[str, Any] = {"model": train_state_dict(self.model,
                                                                lora=self.job.lora_rank > 0)}
            if optimizer is not None:
                dicts["optim"] = get_optimizer_state_dict(self.model, optimizer)
            self._state_dicts, self._state_dicts_key = dicts, key
        if optimizer is not None:
            for saved, live in zip(self._state_dicts["optim"]["param_groups"],
                                   optimizer.param_groups, strict=True):
                saved.update({k: v for k, v in live.items() if k != "params"})
        return dict(self._state_dicts)

    def wait_for_saves(self) -> None:
        """Block until every background save has committed; raise the first one's error."""
        pending, self._pending_saves = self._pending_saves, []
        errors = []
        for future in pending:
            try:
                future.result()
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)
        if errors:
            raise errors[0]

    @property
    def saves_in_flight(self) -> int:
        """Background saves not yet committed (0 or 1)."""
        return sum(not f.done() for f in self._pending_saves)

    def load_state(self, path: str) -> Future[LoadStateResponse]:
        """Load weights from a train state; the optimizer is reset (fresh moments, step 0)."""
        return _done(self._load_state(path, with_optimizer=False))

    def load_state_with_optimizer(self, path: str) -> Future[LoadStateResponse]:
        """Load weights, optimizer moments and the optimizer step count from a train state."""
        return _done(self._load_state(path, with_optimizer=True))

    def _load_state(self, path: str, with_optimizer: bool) -> LoadStateResponse:
        self.wait_for_saves()
        job_id, name = parse_checkpoint_ref(path, default_job_id=self.job_id)
        meta = self.store.get_state(job_id, name)
        if meta.base_model != self.base_model:
            raise ValueError(f"train state {job_id}:{name} was trained from base_model "
                             f"{meta.base_model!r}, but this client trains {self.base_model!r}; "
                             f"create the client with the checkpoint's base model")
        self._optimizer = None
        self.model.zero_grad(set_to_none=True)
        self._pending_backward = False
        self._pending_loss_tokens = self._pending_sequences = 0
        lora = self.job.lora_rank > 0
        if not lora:  # full weights are written below: never into a base other clients share
            own_weights(self.model)
            self._state_dicts_key = None
        # A rank the saving run did not have (it ran with fewer processes) gets rank 0's
        # user state: the data position is the same on every rank.
        saved_world = int(meta.extra.get("world_size", 1))
        user_key = user_state_key(self.world.rank if self.world.rank < saved_world else 0)
        state: dict[str, Any] = {"model": train_state_dict(self.model, lora),
                                 "trainer": {"step": 0}, user_key: b""}
        restore_optimizer = with_optimizer and meta.extra.get("has_optimizer", False)
        if restore_optimizer:
            state["optim"] = get_optimizer_state_dict(self.model, self._ensure_optimizer())
        with self.store.local_copy(self.store.state_dir(job_id, name)) as local:
            verify_state_checksums(local, f"train state {job_id}:{name}")
            dcp_call(dcp.load, state, local, f"loading train state {job_id}:{name}")
        # A LoRA state holds exactly the adapter (DCP refuses a checkpoint that lacks any of it),
        # so non-strict only skips the frozen base weights.
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=not lora))
        if restore_optimizer:
            set_optimizer_state_dict(self.model, self._optimizer, state["optim"])
        self._step = int(state["trainer"]["step"]) if with_optimizer else 0
        if self.loss_scale is not None:  # fp16: the scale goes with the optimizer
            self.loss_scale = DynamicLossScale()
            if with_optimizer:
                self.loss_scale.restore(meta.extra)
        return LoadStateResponse(path=make_cross_job_ref(job_id, name),
                                 user_state=pickle.loads(state[user_key]))

    def list_checkpoints(self) -> list[str]:
        """Names of this job's train states (DCP checkpoints), oldest first."""
        return [m.name for m in self.store.list_states(self.job_id)]

    def resolve_checkpoint_path(self, checkpoint_name: str, source_job_id: str) -> str:
        """A ``cross_job://<job>/<name>`` reference to another job's train state (checked)."""
        self.store.get_state(source_job_id, checkpoint_name)
        return make_cross_job_ref(source_job_id, checkpoint_name)
