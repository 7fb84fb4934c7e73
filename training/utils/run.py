"""The resumable-run scaffolding every recipe shares.

A recipe owns its data and its step; :class:`ResumableRun` owns everything around them: the
resume point in ``log_path``, the identity check that refuses a changed run, the trainer job
(reattached on resume), the data cursor, checkpoint saves (STATE every ``dcp_save_interval``,
BOTH at the end), metrics, progress, and promotion::

    with ResumableRun(config, recipe="sft_loop", dataset=dataset, identity={...}) as run:
        if run.complete_row is not None:
            return run.finish_complete()
        client = run.start(summary="...")
        for batch in run.batches():
            ...  # forward_backward + optim = client.optim_step(run.adam_params())
            run.end_step({"loss": ...}, consumed=len(batch), optim=optim, num_tokens=n)
        return run.finish()

Leaving the ``with`` block in any way (an error in the step, Ctrl-C) closes metrics and progress
and releases the log_path lock and the SIGTERM handler.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.faults import fault_point
from training.sdk import AdamParams, JobNotFoundError, ServiceClient, distributed
from training.sdk.store import CheckpointStore, StoreError, parse_checkpoint_ref
from training.sdk.training_client import TrainingClient, resolve_device
from training.utils.checkpoints import (
    CheckpointKind,
    CheckpointLog,
    CheckpointRow,
    ResumeInfo,
    TrainingCheckpoints,
    check_run_identity,
    promote_from_log,
    read_run_identity,
    record_identity_changes,
    record_run_fields,
)
from training.utils.config import (
    TRAJECTORY_FIELDS,
    ConfigError,
    TrainConfig,
    apply_infra,
    config_to_dict,
    resolve_chat_template,
    tokenizer_name,
    validate_common,
)
from training.utils.data import SupervisedDataset, dataset_fingerprint
from training.utils.lr_schedule import lr_at
from training.utils.metrics import MetricsLogger, Progress, TensorBoardSink, WandbSink

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs are not detected there
    fcntl = None  # type: ignore[assignment]


class RunInUseError(ConfigError):
    """Another live process is running the same ``log_path``."""


class RunLock:
    """An exclusive lock on ``{log_path}/.lock`` held while a run works on its log_path.

    Two processes resuming one log_path would write the same checkpoints and rows. The lock is
    a POSIX record lock: the kernel drops it when its process dies (kill -9 included), so a
    crashed run never blocks its rerun, and it never blocks its own process (recipes called
    twice in one process reuse it). It also makes cleaning up half-written checkpoints of the
    run's job safe: while we hold it, no one else is writing them.
    """

    def __init__(self, log_path: Path) -> None:
        self.path = log_path / LOCK_FILE
        try:
            log_path.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (released)
        except OSError as e:
            raise LogPathError(f"cannot use log_path {log_path}: {e}. It must be a writable "
                               f"directory with free space; nothing was changed") from None
        if fcntl is None:
            return
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise RunInUseError(
                f"{log_path} is in use by another running process (pid {holder}, per "
                f"{self.path}); wait for it to finish or stop it, or use another log_path"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        """Release the lock (safe to call twice)."""
        if not self._file.closed:
            self._file.close()


def load_run_tokenizer(config: TrainConfig) -> Any:
    """The run's tokenizer (:func:`tokenizer_name`, with ``chat_template`` if set), loaded
    before any model is."""
    from training.sdk.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name(config), CheckpointStore(config.infra.storage_root))
    template = resolve_chat_template(config)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


class LogPathError(RuntimeError):
    """The run's log_path (its lock, metrics.jsonl, run.json) cannot be written: full,
    read-only or not a directory. The message names the file and what is still intact."""


class NonFiniteStepError(RuntimeError):
    """A training step's loss or gradient norm was NaN or infinite (see
    ``TrainConfig.non_finite_policy``); the message names the step and the last good
    checkpoint."""


@dataclass
class RunResult:
    """What a finished (or already complete) run produced."""

    log_path: str
    steps: int
    final_checkpoint: CheckpointRow | None
    promoted_model: dict[str, Any] | None = None
    already_complete: bool = False


class ResumableRun:
    """Resume point, trainer, checkpoints, metrics and progress of one recipe run.

    Construction is cheap and validates everything (config, resume/init exclusivity, run
    identity) before any model is loaded.

    Args:
        config: the recipe's config (a :class:`TrainConfig` subclass with a ``dataset``).
        recipe: the recipe's name, recorded in run.json.
        dataset: the run's examples: :meth:`batches` walks them for ``config.epochs`` epochs
            (or ``config.max_steps`` steps) from the resume point.
        identity: what a resumed run must share with the original beyond what every run
            shares (base model, seed, store, tokenizer, max_seq_len, the dataset's
            fingerprint, batch size and the trajectory fields are added here).
    """

    def __init__(self, config: TrainConfig, *, recipe: str, dataset: SupervisedDataset,
                 identity: dict[str, Any]) -> None:
        validate_common(config)
        self.config = config
        self.recipe = recipe
        self.dataset = dataset
        self.total_steps = dataset.num_steps(config.epochs, config.batch_size, config.max_steps)
        """Optimizer steps of the whole run."""
        self.data_limit = config.epochs * len(dataset)
        """Examples the whole run consumes (``epochs`` passes over the dataset)."""
        # Read once (it may be a file): the identity hashes it, start() gives it to the trainer.
        self._chat_template = template = resolve_chat_template(config)
        self._identity = {
            "tokenizer_model": tokenizer_name(config), "max_seq_len": config.max_seq_len,
            **({"chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16]}
               if template is not None else {}),
            "dataset_fingerprint": dataset_fingerprint(config.dataset,
                                                       split=config.dataset_split),
            **identity}
        self.step = 0
        """Optimizer steps done (set by :meth:`start` from the resume point)."""
        self.data_consumed = 0
        """Examples consumed: the data cursor (set by :meth:`start`)."""
        self.user_state: dict[str, Any] = {}
        """Recipe state restored with the resume checkpoint (``end_step``'s ``user_state``)."""
        self._step_started: float | None = None
        self._stop_reason: str | None = None
        self.log_path = Path(config.log_path)
        self.store = CheckpointStore(config.infra.storage_root)
        self.checkpoint_log = CheckpointLog(self.log_path)
        # Under torchrun every rank runs this; rank 0 alone locks and writes log_path, and the
        # others take its resume point (or raise its error).
        self.world = distributed.init_from_env(resolve_device(config.infra.device))
        self._lock: RunLock | None = None
        self._previous_sigterm: Any = None
        (self.resume_row, self._earlier_job_id, self._complete_row,
         self._identity_changes) = distributed.on_main(self._claim_log_path)
        self.service: ServiceClient | None = None
        self.client: TrainingClient | None = None
        self.checkpoints: TrainingCheckpoints | None = None
        self.final_row: CheckpointRow | None = None
        self._metrics: MetricsLogger | None = None
        self._progress: Progress | None = None
        self._non_finite_in_a_row = 0

    def _claim_log_path(self) -> tuple[CheckpointRow | None, str | None,
                                       CheckpointRow | None, dict[str, tuple[Any, Any]]]:
        """Lock log_path, find the resume point (and the final row of a complete run) and
        check the run identity (rank 0: other ranks never read log_path)."""
        config = self.config
        if config.init_from_checkpoint:
            self._check_init_checkpoint(config.init_from_checkpoint)
        self._lock = RunLock(self.log_path)
        try:
            resume_row = self.checkpoint_log.last_resumable()
            if resume_row is not None and config.init_from_checkpoint:
                raise ConfigError(
                    f"init_from_checkpoint={config.init_from_checkpoint!r} but "
                    f"{self.checkpoint_log.path} already has resumable checkpoints (last: "
                    f"{resume_row.name}). init_from_checkpoint starts a new run: use a "
                    f"new log_path, or drop init_from_checkpoint to resume this one.")
            # Read before check_run_identity rewrites run.json for a fresh start.
            earlier_job_id = read_run_identity(self.log_path).get("job_id")
            if resume_row is None and earlier_job_id and not config.init_from_checkpoint:
                self._refuse_lost_log(earlier_job_id)
            identity_changes = check_run_identity(self.log_path, {
                "recipe": self.recipe, "base_model": config.base_model, "seed": config.seed,
                "batch_size": config.batch_size, "storage_root": self.store.root_url,
                "lora_rank": config.lora_rank,
                "mixed_precision": config.infra.mixed_precision,
                **{name: getattr(config, name) for name in TRAJECTORY_FIELDS
                   if hasattr(config, name)},
                **self._identity,
            }, resuming=resume_row is not None,
                overrides=getattr(config, "resume_overrides", ()))
        except OSError as e:
            self._let_go()
            raise LogPathError(f"log_path {self.log_path}: {e}. Make it readable and "
                               f"writable (or free space) and rerun; nothing else was "
                               f"changed") from None
        except BaseException:
            self._let_go()
            raise
        complete_row = None
        stopped = read_run_identity(self.log_path).get("stopped_early") or {}
        if resume_row is not None and (resume_row.step >= self.total_steps
                                       or stopped.get("step") == resume_row.step):
            complete_row = self.checkpoint_log.latest_promotable(resume_row.step)
        return resume_row, earlier_job_id, complete_row, identity_changes

    def _refuse_lost_log(self, job_id: str) -> None:
        """A log_path with no resumable row whose run.json names a job with committed train
        states lost its checkpoints.jsonl: starting over would silently drop them.

        One committed state is not enough to tell: a crash between a save's commit and its row's
        append leaves exactly one (at most one save is in flight), and that run rightly starts
        over. Two or more mean rows were written and then lost."""
        try:
            states = [m.name for m in self.store.list_states(job_id)]
        except StoreError:
            return  # the job is gone from this store: nothing to lose
        if len(states) >= 2:
            raise ConfigError(
                f"{self.checkpoint_log.path} is missing or has no resumable row, but "
                f"{self.log_path / 'run.json'} records trainer job {job_id!r}, which has "
                f"committed train states ({', '.join(states[-5:])}). Restore checkpoints.jsonl "
                f"to resume (a row per state: name, step, data_consumed, state_path), or start "
                f"over: use a new log_path, or delete run.json")

    def _explain_sigterm(self) -> None:
        """On SIGTERM (torchrun stopping the other ranks after one failed, a scheduler's
        preemption, ``kill``), say where a rerun resumes, then stop at once.

        Stopping mid-save or mid-append is as safe as a SIGKILL: nothing incomplete is ever
        recorded. Only installed from the main thread (a Python rule for signal handlers).
        """
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, frame: Any) -> None:
            try:
                last = self.checkpoint_log.last_resumable()
                where = (f"from {last.name} (step {last.step})" if last
                         else "from the start (no checkpoint was recorded yet)")
                who = f"rank {self.world.rank}" if self.world.distributed else "this run"
                print(f"\n{self.recipe}: {who} was stopped by SIGTERM"
                      f"{' (torchrun stops every rank when one fails)' if self.world.distributed else ''}. "
                      f"Rerun the same command to resume {where}.", file=sys.stderr, flush=True)
            finally:
                os._exit(128 + signum)

        self._previous_sigterm = signal.signal(signal.SIGTERM, stop)

    def _say(self, message: str) -> None:
        """Print a run message once (rank 0), not once per rank."""
        if self.world.is_main:
            print(message, flush=True)

    def _let_go(self) -> None:
        """Release the log_path lock and the SIGTERM handler (every way a run ends)."""
        if self._lock is not None:
            self._lock.release()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _check_init_checkpoint(self, ref: str) -> None:
        """Fail before any file is written or model loaded if init_from_checkpoint names a
        job or train state the store lacks, or one trained from another base model."""
        job_id, name = parse_checkpoint_ref(ref)
        meta = self.store.get_state(job_id, name)  # JobNotFoundError / CheckpointNotFoundError
        if meta.base_model != self.config.base_model:
            raise ConfigError(
                f"init_from_checkpoint={ref!r} was trained from base_model "
                f"{meta.base_model!r}, but base_model is {self.config.base_model!r}; set "
                f"base_model={meta.base_model!r} or pick a checkpoint of this base model")

    @property
    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with this one beyond the config's common fields
        (the recipe's keys, the tokenizer, max_seq_len and the dataset's fingerprint)."""
        return dict(self._identity)

    def __enter__(self) -> ResumableRun:
        return self

    def __exit__(self, *exc: object) -> None:
        """Any way out of the ``with`` block: close metrics and progress, and release the
        log_path lock and the SIGTERM handler (a second run of the same log_path may start)."""
        self.close()
        self._let_go()

    # ---------------------------------------------------------------- completion
    @property
    def complete_row(self) -> CheckpointRow | None:
        """The final checkpoint row if this run already reached ``total_steps``."""
        return self._complete_row

    def finish_complete(self) -> RunResult:
        """Report a finished run (promoting it if that was interrupted) and change nothing."""
        row = self.complete_row
        assert row is not None, "finish_complete() needs complete_row"
        self._say(f"Run in {self.log_path} is already complete ({row.step} steps; final "
                  f"checkpoint {row.name}). Nothing to do.")
        try:
            promoted = distributed.on_main(self._promote)
        finally:
            self._let_go()
        if promoted:
            self._say(f"Promoted model: {promoted['name']} at {promoted['path']}")
        return RunResult(str(self.log_path), row.step, row, promoted, already_complete=True)

    # ---------------------------------------------------------------- start
    def start(self, summary: str = "", lora_rank: int | None = None) -> TrainingClient:
        """Create (or reattach) the trainer and restore the resume point or init checkpoint:
        :attr:`step`, :attr:`data_consumed` and :attr:`user_state` are the resume point's.

        Seeds the RNGs and sets the thread count first; resume then overwrites the RNG states
        with the saved ones.
        """
        try:
            client, start = self._start(summary, self.config.lora_rank if lora_rank is None
                                        else lora_rank)
        except BaseException:
            self.close()
            self._let_go()
            raise
        self.step, self.data_consumed = start.step, start.data_consumed
        self.user_state = dict(start.user_state)
        return client

    def _start(self, summary: str, lora_rank: int) -> tuple[TrainingClient, ResumeInfo]:
        config = self.config
        self._explain_sigterm()
        apply_infra(config.infra, config.seed)
        self.service = ServiceClient(config.infra.storage_root, device=config.infra.device,
                                     mixed_precision=config.infra.mixed_precision,
                                     account=config.infra.account,
                                     async_saves=config.infra.async_checkpoint,
                                     compile=config.infra.compile,
                                     gradient_checkpointing=config.infra.gradient_checkpointing)
        self.client = self.service.create_training_client(
            config.base_model, lora_rank=lora_rank, tokenizer_model=config.tokenizer_model,
            job_id=self._job_to_reattach(lora_rank), lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout, lora_target_modules=config.lora_target_modules)
        if self._chat_template is not None:  # sampler snapshots and the promoted model carry it
            self.client.tokenizer.chat_template = self._chat_template
        distributed.on_main(self._record_job)
        self.checkpoints = TrainingCheckpoints(self.client, self.log_path)
        if self.resume_row is not None:
            start = self.checkpoints.resume(self.resume_row)
            where = (f"resuming from {self.resume_row.name} (step {start.step}, "
                     f"{start.data_consumed} examples consumed)")
            if self._identity_changes:  # resume_overrides: the run now goes on with them
                changes = self._identity_changes
                distributed.on_main(lambda: record_identity_changes(self.log_path, changes,
                                                                    start.step))
                where += "; changed " + ", ".join(f"{k} {old!r} -> {new!r}"
                                                  for k, (old, new) in changes.items())
        elif config.init_from_checkpoint:
            start = self.checkpoints.init_from(config.init_from_checkpoint)
            where = f"initialized from {config.init_from_checkpoint}"
        else:
            start = ResumeInfo(step=0, data_consumed=0)
            where = "starting fresh"
        ranks = (f" on {self.world.world_size} ranks" if self.world.distributed else "")
        self._say(f"{self.recipe}: {config.base_model} ({self.client.num_parameters() / 1e6:.2f}M "
                  f"params, job {self.client.job_id}{ranks}); "
                  f"{summary + '; ' if summary else ''}{self.total_steps} steps of batch "
                  f"{config.batch_size}; {where}")
        if self.world.is_main:  # one metrics file and one progress display per run
            self._metrics = MetricsLogger(self.log_path, start_step=start.step,
                                          sinks=self._metric_sinks(start.step))
            self._progress = Progress(self.total_steps, start.step, desc=self.recipe)
        return self.client, start

    def _metric_sinks(self, start_step: int) -> list[Any]:
        """TensorBoard / W&B destinations the config asks for (optional packages)."""
        sinks: list[Any] = []
        tensorboard_dir = getattr(self.config, "tensorboard_dir", None)
        if tensorboard_dir:
            sinks.append(TensorBoardSink(tensorboard_dir, start_step=start_step))
        wandb_project = getattr(self.config, "wandb_project", None)
        if wandb_project:
            sinks.append(WandbSink(self.log_path, wandb_project, name=self.log_path.name,
                                   config=config_to_dict(self.config)))
        return sinks

    def _job_to_reattach(self, lora_rank: int) -> str | None:
        """The trainer job this run continues: the resume row's, else the job an earlier
        attempt of this log_path created but killed before its first resumable row (so the
        rerun reuses it instead of leaving an orphan job behind), else None for a new job."""
        if self.resume_row is not None:
            return self.resume_row.source_job_id
        if not self._earlier_job_id:
            return None
        try:
            job = self.store.get_job(self._earlier_job_id)
        except JobNotFoundError:
            return None
        if job.base_model != self.config.base_model or job.lora_rank != lora_rank:
            return None
        return job.job_id

    def _record_job(self) -> None:
        """Note the trainer job in run.json and drop its half-written checkpoints (rank 0)."""
        assert self.client is not None
        record_run_fields(self.log_path, job_id=self.client.job_id, total_steps=self.total_steps)
        self._remove_incomplete_checkpoints()

    def _remove_incomplete_checkpoints(self) -> None:
        """Delete this run's job's checkpoint directories that have no ``meta.json``.

        Such a directory is a save that died half-way: readers ignore it, but it holds disk.
        Safe because the job belongs to this log_path and :class:`RunLock` guarantees no other
        process of this run is writing one right now. Other jobs are never touched.
        """
        assert self.client is not None
        for path in self.store.incomplete_entries(self.client.job_id):
            logger.warning("removing incomplete checkpoint %s (a save interrupted by a crash; "
                           "it has no meta.json)", self.store.url(path))
            self.store.delete(path)

    # ---------------------------------------------------------------- steps
    def steps(self) -> Iterator[int]:
        """The 0-based index of each step still to run, until ``total_steps``; each step's
        clock starts here. The loop body must end with :meth:`end_step`."""
        while self.step < self.total_steps and self._stop_reason is None:
            step = self.step
            self._step_started = time.perf_counter()
            yield step
            if self.step == step:
                raise RuntimeError(f"step {step + 1} ended without run.end_step(...): call it "
                                   f"once at the end of every step")

    def stop(self, reason: str) -> None:
        """End the run after the step running now (early stopping): :meth:`steps` yields no
        more, :meth:`finish` makes the final (BOTH) save there, and a rerun of this log_path
        reports the run complete (``stopped_early`` in run.json)."""
        self._stop_reason = reason

    def batches(self) -> Iterator[list[Any]]:
        """The next batch of the dataset for each step still to run (the last one of the run
        may be short), from the data cursor."""
        for _ in self.steps():
            yield self.dataset.batch(
                self.data_consumed, min(self.config.batch_size,
                                        self.data_limit - self.data_consumed))

    def adam_params(self, step: int | None = None) -> AdamParams:
        """Optimizer settings for 0-based ``step`` (default: the step running now): the
        config's Adam fields and LR schedule."""
        config = self.config
        step = self.step if step is None else step
        lr = lr_at(step, self.total_steps, config.learning_rate, config.lr_schedule,
                   config.warmup_steps, config.min_lr_ratio)
        return AdamParams(learning_rate=lr, beta1=config.adam_beta1, beta2=config.adam_beta2,
                          eps=config.adam_eps, weight_decay=config.weight_decay,
                          grad_clip_norm=config.grad_clip_norm)

    def end_step(self, metrics: dict[str, Any], *, consumed: int, optim: Any = None,
                 num_tokens: int | None = None, show: tuple[str, ...] = ("loss",),
                 user_state: dict[str, Any] | None = None) -> None:
        """Finish the step running now: advance the cursor by ``consumed`` examples, record
        its metrics and save if a checkpoint is due.

        The common metrics are added here: ``step_time_s`` (since :meth:`steps` yielded),
        ``epoch``, ``learning_rate`` and ``grad_norm`` (from ``optim``, the step's
        ``optim_step`` result) and, with ``num_tokens``, ``num_tokens`` and ``tokens_per_s``.
        ``show`` picks the metrics shown in the progress bar (tokens/s is always shown when
        present). ``user_state`` is extra recipe state to store with a STATE/BOTH save.
        """
        assert self.checkpoints is not None, "call start() first"
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        self.step += 1
        self.data_consumed += consumed
        step, data_consumed = self.step, self.data_consumed
        metrics = dict(metrics)
        if num_tokens is not None:
            metrics.update(num_tokens=num_tokens, tokens_per_s=num_tokens / max(elapsed, 1e-9))
        metrics["step_time_s"] = elapsed
        overflow = False
        if optim is not None:
            metrics.update(learning_rate=optim.metrics["learning_rate"],
                           grad_norm=optim.metrics["grad_norm"])
            if "loss_scale" in optim.metrics:  # fp16
                metrics["loss_scale"] = optim.metrics["loss_scale"]
                # An overflow of the loss scale skipped the update: fp16's normal course while
                # the scale settles, not a non-finite step.
                overflow = optim.metrics.get("overflow") == 1.0
                if overflow:
                    metrics["skipped_overflow"] = 1
        metrics["epoch"] = data_consumed / len(self.dataset)
        bad = {k: metrics[k] for k in ("loss", "grad_norm")
               if isinstance(metrics.get(k), float) and not math.isfinite(metrics[k])
               and not (overflow and k == "grad_norm")}
        if bad:
            # The training client skipped the update (a non-finite gradient never reaches the
            # weights); this decides whether the run goes on.
            self._non_finite_in_a_row += 1
            metrics = {**metrics, "skipped_non_finite": 1}
        else:
            self._non_finite_in_a_row = 0
        if self._metrics is not None and self._progress is not None:  # rank 0
            try:
                self._metrics.log(step, {"data_consumed": data_consumed, "time": time.time(),
                                         **metrics})
            except OSError as e:
                self._log_write_failed(self._metrics.path, e)
            postfix = {k: f"{metrics[k]:.4g}" for k in show if k in metrics}
            if "tokens_per_s" in metrics:
                postfix["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            self._progress.update(step, postfix)
        if self.checkpoints.poll():  # background saves that committed since: record them
            self._apply_retention()
        if bad:
            self._check_non_finite(step, bad)
        fault_point("step")  # test hook: the step is done, its checkpoint not yet saved
        due = step >= self.total_steps or (self.config.dcp_save_interval
                                           and step % self.config.dcp_save_interval == 0)
        if due and self._metrics is not None:
            try:
                self._metrics.sync()  # the rows up to a checkpoint are as durable as it is
            except OSError as e:
                self._log_write_failed(self._metrics.path, e)
        if step >= self.total_steps:
            self.final_row = self.checkpoints.save(f"step-{step}", step=step,
                                                   data_consumed=data_consumed,
                                                   kind=CheckpointKind.BOTH,
                                                   user_state=user_state)
        elif self.config.dcp_save_interval and step % self.config.dcp_save_interval == 0:
            self.checkpoints.save(f"step-{step}", step=step, data_consumed=data_consumed,
                                  kind=CheckpointKind.STATE, user_state=user_state)
            self._apply_retention()

    def _log_write_failed(self, path: Path, error: OSError) -> None:
        assert self.checkpoints is not None
        last = self.checkpoints.log.last_resumable()
        resume = (f"the last checkpoint, {last.name} (step {last.step}), is intact: a rerun "
                  f"resumes from it" if last else "no checkpoint was saved yet")
        raise LogPathError(f"writing {path} failed: {error}. Free space on (or make writable) "
                           f"{self.log_path}; {resume}") from None

    def _check_non_finite(self, step: int, bad: dict[str, float]) -> None:
        """Stop the run on a non-finite step (or the max_non_finite_steps-th in a row with
        non_finite_policy=skip), naming the last good checkpoint; nothing is saved after it."""
        config = self.config
        what = " and ".join(f"{k} is {v}" for k, v in bad.items())
        skipping = getattr(config, "non_finite_policy", "error") == "skip"
        limit = getattr(config, "max_non_finite_steps", 3)
        if skipping and self._non_finite_in_a_row < limit:
            logger.warning("step %d: %s; the update was skipped (non_finite_policy=skip, %d in "
                           "a row)", step, what, self._non_finite_in_a_row)
            return
        assert self.checkpoints is not None
        self.checkpoints.wait()
        last = self.checkpoints.log.last_resumable()
        resume = (f"The last good checkpoint is {last.name} (step {last.step}): a rerun "
                  f"resumes from it" if last else "No checkpoint was saved yet: a rerun starts "
                  "over")
        why = (f"{self._non_finite_in_a_row} steps in a row were non-finite" if skipping
               else "non_finite_policy=error")
        raise NonFiniteStepError(
            f"step {step}: {what}; the update was not applied and nothing was saved after it "
            f"({why}). {resume}. Lower learning_rate, set grad_clip_norm, check the data, or "
            f"set non_finite_policy=skip to skip such steps")

    def _apply_retention(self) -> None:
        assert self.checkpoints is not None
        self.checkpoints.apply_retention(getattr(self.config, "keep_last_n", None))

    # ---------------------------------------------------------------- end
    def finish(self) -> RunResult:
        """Close metrics and progress, make sure the final save is BOTH, promote, report."""
        assert self.checkpoints is not None, "call start() first"
        step, data_consumed = self.step, self.data_consumed
        self.close()
        try:
            if self._stop_reason is not None and self.final_row is None:
                # Recorded before the final save: a crash between them reruns the same steps
                # and stops at the same place.
                reason = self._stop_reason
                distributed.on_main(lambda: record_run_fields(
                    self.log_path, stopped_early={"step": step, "reason": reason}))
                self._say(f"{self.recipe}: stopping early at step {step} of "
                          f"{self.total_steps}: {reason}")
            if self.final_row is None:
                # Resumed at or past a (lowered) step budget, or stopped early: the final save
                # is still BOTH. A state already saved at this step (the resume point, or a
                # periodic save) is recorded instead of saved again, since re-saving a name
                # deletes it first and a crash then would lose the checkpoint the run needs.
                self.checkpoints.wait()
                last = self.checkpoint_log.last_resumable()
                same_step = last is not None and last.step == step
                self.final_row = self.checkpoints.save(
                    f"step-{step}", step=step, data_consumed=data_consumed,
                    kind=CheckpointKind.BOTH,
                    existing_state_path=last.state_path if same_step else None)
            self.checkpoints.wait()
            self._apply_retention()
            promoted = distributed.on_main(self._promote)
        finally:
            self._let_go()
        self._say(f"Done. Checkpoints: {self.checkpoint_log.path} (final: "
                  f"{self.final_row.name}, sampler {self.final_row.sampler_path})")
        if promoted:
            self._say(f"Promoted model: {promoted['name']} at {promoted['path']}")
        return RunResult(str(self.log_path), step, self.final_row, promoted)

    def close(self) -> None:
        """Close the progress bar and metrics file (safe to call twice; call on errors too)."""
        if self._progress is not None:
            self._progress.close()
        if self._metrics is not None:
            self._metrics.close()

    def _promote(self) -> dict[str, Any] | None:
        if not self.config.output_model_id:
            return None
        return promote_from_log(self.checkpoint_log, self.store, self.config.output_model_id,
                                account=self.config.infra.account,
                                merge=self.config.merge_lora_on_promote)
