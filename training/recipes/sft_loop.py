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
from training.utils.config import TrainConfig, validate_common
from training.utils.data import (
    LongRowPolicy,
    SupervisedDataset,
    build_sft_examples,
    example_to_datum,
    load_chat_rows,
)
from training.utils.run import ResumableRun, RunResult, load_run_tokenizer


@dataclass(kw_only=True)
class Config(TrainConfig):
    """SFT settings: the shared :class:`TrainConfig` fields plus these."""

    dataset: str = str(SAMPLE_CHATS_PATH)
    """Training rows: a JSONL file or any `datasets` source (a save_to_disk directory, a
    parquet/csv/json file, a hub name) of chats ({"messages": [...]}, OpenAI format),
    prompt/completion pairs ({"prompt", "completion"}: trained on the completion) or plain
    text ({"text"}: continued pre-training), mixed freely. Default: bundled sample chats."""
    long_row_policy: LongRowPolicy = LongRowPolicy.drop
    """Rows over max_seq_len: 'drop' (counted), 'truncate' or 'error' (names file:line)."""
    grad_accumulation_normalization: GradAccNormalization = GradAccNormalization.num_loss_tokens
    """'num_loss_tokens' (mean over trained tokens), 'num_sequences' or 'none'."""


def validate(config: Config) -> None:
    validate_common(config)


def main(config: Config) -> RunResult:
    validate(config)

    # ---- data: validated and tokenized before any model is loaded
    tokenizer = load_run_tokenizer(config)
    rows = load_chat_rows(config.dataset, split=config.dataset_split, text_rows=True)
    examples, stats = build_sft_examples(rows, tokenizer, config.max_seq_len,
                                         config.long_row_policy)
    dataset = SupervisedDataset(examples, seed=config.seed)

    # ---- resume point, or nothing left to do
    with ResumableRun(config, recipe="sft_loop", dataset=dataset,
                      identity={"long_row_policy": config.long_row_policy}) as run:
        if run.complete_row is not None:
            return run.finish_complete()
        client = run.start(summary=f"{len(dataset)} examples [{stats.summary()}]")

        # ---- training loop: one optimizer step per batch of conversations
        for batch in run.batches():
            datums = [example_to_datum(example) for example in batch]
            fwd_bwd = client.forward_backward(datums, "cross_entropy").result()
            optim = client.optim_step(run.adam_params(),
                                      grad_accumulation_normalization=(
                                          config.grad_accumulation_normalization)).result()
            loss_tokens = fwd_bwd.metrics["num_loss_tokens"]
            run.end_step({"loss": fwd_bwd.metrics["loss:sum"] / max(loss_tokens, 1),
                          "num_loss_tokens": loss_tokens},
                         consumed=len(batch), optim=optim,
                         num_tokens=sum(d.model_input.length for d in datums))
        return run.finish()
