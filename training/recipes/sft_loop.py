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

from dataclasses import dataclass

from training.sdk import SAMPLE_CHATS_PATH, GradAccNormalization
from training.utils.config import ConfigError, TrainConfig, validate_common
from training.utils.data import (
    LongRowPolicy,
    SupervisedDataset,
    build_sft_examples,
    example_to_datum,
    load_chat_rows,
)
from training.utils.evaluation import (
    EarlyStopping,
    EvalConfig,
    eval_loss,
    evaluate_if_due,
    hold_out,
    validate_eval,
)
from training.utils.run import ResumableRun, RunResult, load_run_tokenizer


@dataclass(kw_only=True)
class Config(TrainConfig, EvalConfig):
    """SFT settings: the shared :class:`TrainConfig` and :class:`EvalConfig` fields plus
    these."""

    dataset: str = str(SAMPLE_CHATS_PATH)
    """Training rows: a JSONL file or any `datasets` source (a save_to_disk directory, a
    parquet/csv/json file, a hub name) of chats ({"messages": [...]}, OpenAI format),
    prompt/completion pairs ({"prompt", "completion"}: trained on the completion) or plain
    text ({"text"}: continued pre-training), mixed freely. Default: bundled sample chats."""
    long_row_policy: LongRowPolicy = LongRowPolicy.drop
    """Rows over max_seq_len: 'drop' (counted), 'truncate' or 'error' (names file:line)."""
    grad_accumulation_normalization: GradAccNormalization = GradAccNormalization.num_loss_tokens
    """'num_loss_tokens' (mean over trained tokens), 'num_sequences' or 'none'."""
    grad_accumulation_steps: int = 1
    """Run each batch as this many forward_backward calls before its optim_step: activations
    of one part at a time (a big batch in less memory), the same update up to float summation
    order (with num_loss_tokens or num_sequences normalization)."""


def validate(config: Config) -> None:
    validate_common(config)
    validate_eval(config)
    if not 1 <= config.grad_accumulation_steps <= config.batch_size:
        raise ConfigError(f"grad_accumulation_steps must be between 1 and batch_size "
                          f"({config.batch_size}), got {config.grad_accumulation_steps}")


def main(config: Config) -> RunResult:
    validate(config)

    # ---- data: validated and tokenized before any model is loaded
    tokenizer = load_run_tokenizer(config)
    rows = load_chat_rows(config.dataset, split=config.dataset_split, text_rows=True)
    examples, stats = build_sft_examples(rows, tokenizer, config.max_seq_len,
                                         config.long_row_policy)
    examples, eval_examples = hold_out(examples, config.eval_fraction, config.seed)
    if config.eval_dataset:
        eval_rows = load_chat_rows(config.eval_dataset, split=config.dataset_split, text_rows=True)
        eval_examples, _ = build_sft_examples(eval_rows, tokenizer, config.max_seq_len,
                                              config.long_row_policy)
    eval_datums = [example_to_datum(example) for example in eval_examples]
    dataset = SupervisedDataset(examples, seed=config.seed)

    # ---- resume point, or nothing left to do
    with ResumableRun(config, recipe="sft_loop", dataset=dataset, identity={
            "long_row_policy": config.long_row_policy,
            "grad_accumulation_steps": config.grad_accumulation_steps,
            "eval_fraction": config.eval_fraction,
            "early_stopping_patience": config.early_stopping_patience}) as run:
        if run.complete_row is not None:
            return run.finish_complete()
        client = run.start(summary=f"{len(dataset)} examples [{stats.summary()}]")

        # ---- training loop: one optimizer step per batch of conversations
        early_stopping = EarlyStopping(config.early_stopping_patience, run.user_state)
        for batch in run.batches():
            datums = [example_to_datum(example) for example in batch]
            # Gradients accumulate over the parts until optim_step normalizes them.
            part = -(-len(datums) // config.grad_accumulation_steps)
            parts = [client.forward_backward(datums[i:i + part], "cross_entropy").result()
                     for i in range(0, len(datums), part)]
            optim = client.optim_step(run.adam_params(),
                                      grad_accumulation_normalization=(
                                          config.grad_accumulation_normalization)).result()
            loss_sum = sum(p.metrics["loss:sum"] for p in parts)
            loss_tokens = sum(p.metrics["num_loss_tokens"] for p in parts)
            metrics = {"loss": loss_sum / max(loss_tokens, 1), "num_loss_tokens": loss_tokens}
            if eval_datums:
                metrics.update(evaluate_if_due(run, config, early_stopping, lambda: {
                    "eval_loss": eval_loss(client, eval_datums, config.batch_size)}))
            run.end_step(metrics, user_state=early_stopping.state(),
                         consumed=len(batch), optim=optim,
                         num_tokens=sum(d.model_input.length for d in datums),
                         show=("loss", "eval_loss"))
        return run.finish()
