"""The resumable-run scaffolding every recipe shares.

A recipe owns its data and its step; :class:`ResumableRun` owns everything around them: the
resume point in ``log_path``, the identity check that refuses a changed run, the trainer job
(reattached on resume), checkpoint saves (STATE every ``dcp_save_interval``, BOTH at the end),
metrics, progress, and promotion::

    run = ResumableRun(config, recipe="sft_loop", identity={...}, total_steps=n)
    if run.complete_row is not None:
        return run.finish_complete()
    client, start = run.start(summary="...")
    step, data_consumed = start.step, start.data_consumed
    while step < run.total_steps:
        ...  # forward_backward + client.optim_step(run.adam_params(step))
        step += 1
        run.end_step(step, data_consumed, {"loss": ...})
    return run.finish()
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.sdk import AdamParams, ServiceClient
from training.sdk.store import CheckpointStore
from training.sdk.training_client import TrainingClient
from training.utils.checkpoints import (
    CheckpointKind,
    CheckpointLog,
    ResumeInfo,
    TrainingCheckpoints,
    check_run_identity,
    promote_from_log,
)
from training.utils.config import ConfigError, TrainConfig, apply_infra, validate_common
from training.utils.lr_schedule import lr_at
from training.utils.metrics import MetricsLogger, Progress

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished (or already complete) run produced."""

    log_path: str
    steps: int
    final_checkpoint: dict[str, Any] | None
    promoted_model: dict[str, Any] | None = None
    already_complete: bool = False


class ResumableRun:
    """Resume point, trainer, checkpoints, metrics and progress of one recipe run.

    Construction is cheap and validates everything (config, resume/init exclusivity, run
    identity) before any model is loaded.

    Args:
        config: the recipe's config (a :class:`TrainConfig` subclass).
        recipe: the recipe's name, recorded in run.json.
        identity: what a resumed run must share with the original (dataset fingerprint, batch
            size, ...); base model, seed and store are added here.
        total_steps: optimizer steps of the whole run.
    """

    def __init__(self, config: TrainConfig, *, recipe: str, identity: dict[str, Any],
                 total_steps: int) -> None:
        validate_common(config)
        self.config = config
        self.recipe = recipe
        self.total_steps = total_steps
        self.log_path = Path(config.log_path)
        self.store = CheckpointStore(config.infra.storage_root)
        self.checkpoint_log = CheckpointLog(self.log_path)
        self.resume_row = self.checkpoint_log.last_resumable()
        if self.resume_row is not None and config.init_from_checkpoint:
            raise ConfigError(
                f"init_from_checkpoint={config.init_from_checkpoint!r} but "
                f"{self.checkpoint_log.path} already has resumable checkpoints (last: "
                f"{self.resume_row['name']}). init_from_checkpoint starts a new run: use a new "
                f"log_path, or drop init_from_checkpoint to resume this one.")
        check_run_identity(self.log_path, {
            "recipe": recipe, "base_model": config.base_model, "seed": config.seed,
            "batch_size": config.batch_size, "storage_root": self.store.root_url, **identity,
        }, resuming=self.resume_row is not None)
        self.service: ServiceClient | None = None
        self.client: TrainingClient | None = None
        self.checkpoints: TrainingCheckpoints | None = None
        self.final_row: dict[str, Any] | None = None
        self._metrics: MetricsLogger | None = None
        self._progress: Progress | None = None

    # ---------------------------------------------------------------- completion
    @property
    def complete_row(self) -> dict[str, Any] | None:
        """The final checkpoint row if this run already reached ``total_steps``."""
        if self.resume_row is None or self.resume_row["step"] < self.total_steps:
            return None
        return self.checkpoint_log.latest_promotable(self.resume_row["step"])

    def finish_complete(self) -> RunResult:
        """Report a finished run (promoting it if that was interrupted) and change nothing."""
        row = self.complete_row
        assert row is not None, "finish_complete() needs complete_row"
        print(f"Run in {self.log_path} is already complete ({row['step']} steps; final "
              f"checkpoint {row['name']}). Nothing to do.", flush=True)
        return RunResult(str(self.log_path), row["step"], row, self._promote(),
                         already_complete=True)

    # ---------------------------------------------------------------- start
    def start(self, summary: str = "", lora_rank: int = 0,
              ) -> tuple[TrainingClient, ResumeInfo]:
        """Create (or reattach) the trainer and restore the resume point or init checkpoint.

        Seeds the RNGs and sets the thread count first; resume then overwrites the RNG states
        with the saved ones.
        """
        config = self.config
        apply_infra(config.infra, config.seed)
        self.service = ServiceClient(config.infra.storage_root, device=config.infra.device,
                                     mixed_precision=config.infra.mixed_precision,
                                     account=config.infra.account)
        self.client = self.service.create_training_client(
            config.base_model, lora_rank=lora_rank, tokenizer_model=config.tokenizer_model,
            job_id=self.resume_row["source_job_id"] if self.resume_row else None)
        self.checkpoints = TrainingCheckpoints(self.client, self.log_path)
        if self.resume_row is not None:
            start = self.checkpoints.resume(self.resume_row)
            where = (f"resuming from {self.resume_row['name']} (step {start.step}, "
                     f"{start.data_consumed} examples consumed)")
        elif config.init_from_checkpoint:
            start = self.checkpoints.init_from(config.init_from_checkpoint)
            where = f"initialized from {config.init_from_checkpoint}"
        else:
            start = ResumeInfo(step=0, data_consumed=0)
            where = "starting fresh"
        print(f"{self.recipe}: {config.base_model} ({self.client.num_parameters() / 1e6:.2f}M "
              f"params, job {self.client.job_id}); {summary + '; ' if summary else ''}"
              f"{self.total_steps} steps of batch {config.batch_size}; {where}", flush=True)
        self._metrics = MetricsLogger(self.log_path, start_step=start.step)
        self._progress = Progress(self.total_steps, start.step, desc=self.recipe)
        return self.client, start

    # ---------------------------------------------------------------- steps
    def adam_params(self, step: int) -> AdamParams:
        """Optimizer settings for 0-based ``step``: the config's Adam fields and LR schedule."""
        config = self.config
        lr = lr_at(step, self.total_steps, config.learning_rate, config.lr_schedule,
                   config.warmup_steps)
        return AdamParams(learning_rate=lr, beta1=config.adam_beta1, beta2=config.adam_beta2,
                          eps=config.adam_eps, weight_decay=config.weight_decay,
                          grad_clip_norm=config.grad_clip_norm)

    def end_step(self, step: int, data_consumed: int, metrics: dict[str, Any],
                 show: tuple[str, ...] = ("loss",),
                 user_state: dict[str, Any] | None = None) -> None:
        """Record step ``step`` (1-based, just finished) and save if it is due.

        ``show`` picks the metrics shown in the progress bar (tokens/s is always shown when
        present). ``user_state`` is extra recipe state to store with a STATE/BOTH save.
        """
        assert self.checkpoints is not None and self._metrics is not None, "call start() first"
        self._metrics.log(step, {"data_consumed": data_consumed, "time": time.time(), **metrics})
        postfix = {k: f"{metrics[k]:.4g}" for k in show if k in metrics}
        if "tokens_per_s" in metrics:
            postfix["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
        self._progress.update(step, postfix)
        if step >= self.total_steps:
            self.final_row = self.checkpoints.save(f"step-{step}", step=step,
                                                   data_consumed=data_consumed,
                                                   kind=CheckpointKind.BOTH,
                                                   user_state=user_state)
        elif self.config.dcp_save_interval and step % self.config.dcp_save_interval == 0:
            self.checkpoints.save(f"step-{step}", step=step, data_consumed=data_consumed,
                                  kind=CheckpointKind.STATE, user_state=user_state)

    # ---------------------------------------------------------------- end
    def finish(self, step: int, data_consumed: int) -> RunResult:
        """Close metrics and progress, make sure the final save is BOTH, promote, report."""
        assert self.checkpoints is not None, "call start() first"
        self.close()
        if self.final_row is None:
            # Resumed at or past a (lowered) step budget: the final save is still BOTH.
            self.final_row = self.checkpoints.save(f"step-{step}", step=step,
                                                   data_consumed=data_consumed,
                                                   kind=CheckpointKind.BOTH)
        promoted = self._promote()
        print(f"Done. Checkpoints: {self.checkpoint_log.path} (final: {self.final_row['name']}, "
              f"sampler {self.final_row['sampler_path']})", flush=True)
        if promoted:
            print(f"Promoted model: {promoted['name']} at {promoted['path']}", flush=True)
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
                                account=self.config.infra.account)
