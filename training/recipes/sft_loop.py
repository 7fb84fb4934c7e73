"""Supervised fine-tuning on chat data, resumable: rerun with the same ``log_path`` to continue.

Python::

    from training.recipes.sft_loop import Config, main
    from training.utils import InfraConfig
    main(Config(log_path="./my_training", dataset="data.jsonl", dcp_save_interval=10))

Command line (Hydra)::

    python -m recipes.sft_loop log_path=./my_training dataset=data.jsonl dcp_save_interval=10

The loop reads top to bottom: config -> data -> resume point -> trainer -> steps -> final save ->
promotion. Fork it to change what a step does; the pieces it calls live in ``training.utils``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.sdk import AdamParams, GradAccNormalization, ServiceClient
from training.sdk.models import load_tokenizer
from training.sdk.store import CheckpointStore
from training.sdk.tiny_model import SAMPLE_CHATS_PATH
from training.utils.checkpoints import (
    CheckpointKind,
    CheckpointLog,
    ResumeInfo,
    TrainingCheckpoints,
    check_run_identity,
    promote_from_log,
)
from training.utils.config import ConfigError, InfraConfig, apply_infra, validate_common
from training.utils.data import (
    SupervisedDataset,
    build_sft_examples,
    dataset_fingerprint,
    example_to_datum,
    load_chat_rows,
)
from training.utils.lr_schedule import LR_SCHEDULES, lr_at
from training.utils.metrics import MetricsLogger, Progress

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Config:
    """SFT recipe settings. The defaults run the embedded demo (tiny model, sample chats)."""

    log_path: str
    """Directory for checkpoints.jsonl, metrics.jsonl and run.json. Required. Rerun with the
    same log_path to resume."""
    base_model: str = "homefire/tiny-qwen3"
    """Model to fine-tune: a built-in tiny model, a local HF directory, a promoted model
    (accounts/<a>/models/<id>) or a Hugging Face hub id."""
    tokenizer_model: str | None = None
    """Tokenizer (with chat template) to render the data; default: base_model's."""
    dataset: str = str(SAMPLE_CHATS_PATH)
    """Chat data: a JSONL file in the OpenAI chat format, or any `datasets` source (a
    save_to_disk directory, a parquet/csv/json file, a hub name). Default: bundled sample."""
    dataset_split: str = "train"
    """Split to use for `datasets` sources."""
    max_seq_len: int = 512
    """Longest row in tokens; see long_row_policy for longer rows."""
    long_row_policy: str = "drop"
    """Rows over max_seq_len: 'drop' (counted), 'truncate' or 'error' (names file:line)."""
    batch_size: int = 8
    """Conversations per optimizer step."""
    epochs: int = 3
    """Passes over the data (the data order is reshuffled each epoch from `seed`)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (caps `epochs`)."""
    learning_rate: float = 1e-3
    """Peak learning rate. 1e-3 suits the tiny demo model; use ~1e-5 for billion-parameter
    full fine-tuning."""
    lr_schedule: str = "linear"
    """'constant', 'linear' or 'cosine' decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    grad_accumulation_normalization: str = "num_loss_tokens"
    """'num_loss_tokens' (mean over trained tokens), 'num_sequences' or 'none'."""
    dcp_save_interval: int = 0
    """Save a resumable STATE checkpoint every N steps; 0 = off (then an interrupted run
    restarts from scratch)."""
    init_from_checkpoint: str | None = None
    """Start from the weights of another job's checkpoint, 'job_id:checkpoint_name'; step
    resets to 0. Cannot be combined with resuming an existing log_path."""
    output_model_id: str | None = None
    """If set, promote the final checkpoint to accounts/<account>/models/<output_model_id>."""
    seed: int = 0
    """Seeds data order and RNGs."""
    infra: InfraConfig = field(default_factory=InfraConfig)


@dataclass
class RunResult:
    """What a finished (or already complete) run produced."""

    log_path: str
    steps: int
    final_checkpoint: dict[str, Any] | None
    promoted_model: dict[str, Any] | None = None
    already_complete: bool = False


def validate(config: Config) -> None:
    validate_common(config)
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule={config.lr_schedule!r}: expected one of "
                          f"{', '.join(LR_SCHEDULES)}")
    try:
        GradAccNormalization(config.grad_accumulation_normalization)
    except ValueError as e:
        choices = ", ".join(m.value for m in GradAccNormalization)
        raise ConfigError(f"grad_accumulation_normalization="
                          f"{config.grad_accumulation_normalization!r}: expected one of "
                          f"{choices}") from e


def main(config: Config) -> RunResult:
    validate(config)
    apply_infra(config.infra, config.seed)
    log_path = Path(config.log_path)
    store = CheckpointStore(config.infra.storage_root)

    # ---- data: validated and tokenized before any expensive model work
    tokenizer_name = config.tokenizer_model or config.base_model
    tokenizer = load_tokenizer(tokenizer_name, store)
    rows = load_chat_rows(config.dataset, split=config.dataset_split)
    examples, stats = build_sft_examples(rows, tokenizer, config.max_seq_len,
                                         config.long_row_policy)
    dataset = SupervisedDataset(examples, seed=config.seed)
    total_steps = dataset.num_steps(config.epochs, config.batch_size)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    data_limit = config.epochs * len(dataset)

    # ---- resume point: the last checkpoint with a state_path in log_path
    checkpoint_log = CheckpointLog(log_path)
    resume_row = checkpoint_log.last_resumable()
    if resume_row is not None and config.init_from_checkpoint:
        raise ConfigError(
            f"init_from_checkpoint={config.init_from_checkpoint!r} but {checkpoint_log.path} "
            f"already has resumable checkpoints (last: {resume_row['name']}). "
            f"init_from_checkpoint starts a new run: use a new log_path, or drop "
            f"init_from_checkpoint to resume this one.")
    check_run_identity(log_path, {
        "recipe": "sft_loop", "base_model": config.base_model, "tokenizer_model": tokenizer_name,
        "dataset_fingerprint": dataset_fingerprint(config.dataset, split=config.dataset_split),
        "batch_size": config.batch_size, "max_seq_len": config.max_seq_len,
        "long_row_policy": config.long_row_policy, "seed": config.seed,
        "storage_root": store.root_url,
    }, resuming=resume_row is not None)

    final_row = checkpoint_log.latest_promotable(total_steps)
    if final_row is not None and resume_row is not None and resume_row["step"] >= total_steps:
        print(f"Run in {log_path} is already complete ({total_steps} steps; final checkpoint "
              f"{final_row['name']}). Nothing to do.")
        promoted = _promote(config, store, checkpoint_log)
        return RunResult(str(log_path), total_steps, final_row, promoted, already_complete=True)

    # ---- trainer: reattach to the job of the checkpoint we resume from
    service = ServiceClient(config.infra.storage_root, device=config.infra.device,
                            mixed_precision=config.infra.mixed_precision,
                            account=config.infra.account)
    client = service.create_training_client(
        config.base_model, lora_rank=0, tokenizer_model=config.tokenizer_model,
        job_id=resume_row["source_job_id"] if resume_row else None)
    checkpoints = TrainingCheckpoints(client, log_path)
    if resume_row is not None:
        start = checkpoints.resume(resume_row)
    elif config.init_from_checkpoint:
        start = checkpoints.init_from(config.init_from_checkpoint)
    else:
        start = ResumeInfo(step=0, data_consumed=0)
    _print_start(config, client, stats.summary(), len(dataset), total_steps, start)

    # ---- training loop
    step, data_consumed = start.step, start.data_consumed
    metrics_log = MetricsLogger(log_path, start_step=step)
    progress = Progress(total_steps, step, desc="sft")
    normalization = GradAccNormalization(config.grad_accumulation_normalization)
    final_row = None
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            batch = dataset.batch(data_consumed,
                                  min(config.batch_size, data_limit - data_consumed))
            datums = [example_to_datum(example) for example in batch]
            fwd_bwd = client.forward_backward(datums, "cross_entropy").result()
            lr = lr_at(step, total_steps, config.learning_rate, config.lr_schedule,
                       config.warmup_steps)
            optim = client.optim_step(
                AdamParams(learning_rate=lr, beta1=config.adam_beta1, beta2=config.adam_beta2,
                           eps=config.adam_eps, weight_decay=config.weight_decay,
                           grad_clip_norm=config.grad_clip_norm),
                grad_accumulation_normalization=normalization).result()
            step += 1
            data_consumed += len(batch)
            elapsed = time.perf_counter() - t0
            num_tokens = sum(d.model_input.length for d in datums)
            loss_tokens = fwd_bwd.metrics["num_loss_tokens"]
            row = {"loss": fwd_bwd.metrics["loss:sum"] / max(loss_tokens, 1),
                   "num_loss_tokens": loss_tokens, "num_tokens": num_tokens,
                   "tokens_per_s": num_tokens / elapsed, "step_time_s": elapsed,
                   "learning_rate": lr, "grad_norm": optim.metrics["grad_norm"],
                   "data_consumed": data_consumed, "epoch": data_consumed / len(dataset)}
            metrics_log.log(step, row)
            progress.update(step, {"loss": f"{row['loss']:.4f}",
                                   "tok/s": f"{row['tokens_per_s']:.0f}"})

            if step == total_steps:
                final_row = checkpoints.save(f"step-{step}", step=step,
                                             data_consumed=data_consumed,
                                             kind=CheckpointKind.BOTH)
            elif config.dcp_save_interval and step % config.dcp_save_interval == 0:
                checkpoints.save(f"step-{step}", step=step, data_consumed=data_consumed,
                                 kind=CheckpointKind.STATE)
        if final_row is None:
            # Resumed at or past the (possibly lowered) step budget: the final save is still BOTH.
            final_row = checkpoints.save(f"step-{step}", step=step, data_consumed=data_consumed,
                                         kind=CheckpointKind.BOTH)
    finally:
        progress.close()
        metrics_log.close()

    promoted = _promote(config, store, checkpoint_log)
    _print_end(log_path, final_row, promoted)
    return RunResult(str(log_path), step, final_row, promoted)


def _promote(config: Config, store: CheckpointStore,
             checkpoint_log: CheckpointLog) -> dict[str, Any] | None:
    """Promote the final checkpoint when output_model_id is set (idempotent on rerun)."""
    if not config.output_model_id:
        return None
    return promote_from_log(checkpoint_log, store, config.output_model_id,
                            account=config.infra.account)


def _print_start(config: Config, client: Any, data_summary: str, n_examples: int,
                 total_steps: int, start: ResumeInfo) -> None:
    where = (f"resuming from {start.row['name']} (step {start.step}, "
             f"{start.data_consumed} examples consumed)" if start.row
             else f"initialized from {config.init_from_checkpoint}"
             if config.init_from_checkpoint else "starting fresh")
    print(f"SFT {config.base_model} ({client.num_parameters() / 1e6:.2f}M params, job "
          f"{client.job_id}) on {n_examples} examples [{data_summary}]; "
          f"{total_steps} steps of batch {config.batch_size}; {where}", flush=True)


def _print_end(log_path: Path, final_row: dict[str, Any] | None,
               promoted: dict[str, Any] | None) -> None:
    print(f"Done. Checkpoints: {log_path / 'checkpoints.jsonl'}"
          + (f" (final: {final_row['name']}, sampler {final_row['sampler_path']})"
             if final_row else ""), flush=True)
    if promoted:
        print(f"Promoted model: {promoted['name']} at {promoted['path']}", flush=True)
