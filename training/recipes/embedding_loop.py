"""Contrastive embedding training on (query, positive[, negative]) pairs, resumable.

Python::

    from training.recipes.embedding_loop import Config, main
    main(Config(log_path="./my_embeddings", dataset="pairs.jsonl", dcp_save_interval=10))

Command line (Hydra)::

    python -m recipes.embedding_loop log_path=./my_embeddings dataset=pairs.jsonl

Each step embeds a batch of queries, their positives and any hard negatives with
``forward_backward_custom(..., output="embedding", pooling=...)`` (the model's final hidden
states, pooled) and takes one step on the InfoNCE loss with in-batch negatives
(:mod:`training.utils.embedding_data`). Checkpoints, resume and promotion are the other
recipes': the promoted model is the fine-tuned transformer; embed with it by pooling its last
hidden states the same way (``pooling``).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from training.sdk import GradAccNormalization
from training.sdk.models import load_tokenizer
from training.sdk.store import CheckpointStore
from training.utils.config import ConfigError, TrainConfig, validate_common
from training.utils.data import SupervisedDataset, dataset_fingerprint
from training.utils.embedding_data import SAMPLE_PAIRS_PATH, load_pairs, pair_datums, pair_loss
from training.utils.run import ResumableRun, RunResult

POOLINGS = ("mean", "last")


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Embedding settings: the shared :class:`TrainConfig` fields plus these. The defaults train
    the tiny model on the bundled pairs (40 steps; seconds on 2 CPU cores)."""

    dataset: str = str(SAMPLE_PAIRS_PATH)
    """Pairs: JSONL (or any `datasets` source) of rows with 'query' (or 'anchor'), 'positive'
    and optionally 'negative' texts. Default: the bundled question/answer pairs."""
    pooling: str = "mean"
    """'mean' (average of the text's final hidden states) or 'last' (the end-of-sequence
    token's)."""
    temperature: float = 0.05
    """Softmax temperature of the InfoNCE loss over cosine similarities (> 0)."""
    batch_size: int = 16
    """Pairs per optimizer step; every other pair of the batch is a negative (>= 2)."""
    epochs: int = 2
    max_seq_len: int = 128
    """Longest text, in tokens; longer texts are truncated (counted at start)."""


def validate(config: Config) -> None:
    validate_common(config)
    if config.pooling not in POOLINGS:
        raise ConfigError(f"pooling={config.pooling!r}: expected one of {', '.join(POOLINGS)}")
    if not config.temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {config.temperature}")
    if config.batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2 (the other pairs of a batch are the "
                          f"negatives), got {config.batch_size}")


def main(config: Config) -> RunResult:
    validate(config)

    # ---- data: validated and tokenized before any model is loaded
    tokenizer_name = config.tokenizer_model or config.base_model
    tokenizer = load_tokenizer(tokenizer_name, CheckpointStore(config.infra.storage_root))
    pairs, stats = load_pairs(config.dataset, tokenizer, config.max_seq_len,
                              split=config.dataset_split)
    dataset = SupervisedDataset(pairs, seed=config.seed)
    total_steps = dataset.num_steps(config.epochs, config.batch_size, config.max_steps)
    data_limit = config.epochs * len(dataset)

    # ---- resume point, or nothing left to do
    run = ResumableRun(config, recipe="embedding_loop", total_steps=total_steps, identity={
        "tokenizer_model": tokenizer_name, "max_seq_len": config.max_seq_len,
        "pooling": config.pooling, "temperature": config.temperature,
        "dataset_fingerprint": dataset_fingerprint(config.dataset, split=config.dataset_split),
    })
    if run.complete_row is not None:
        return run.finish_complete()
    client, start = run.start(summary=stats.summary())

    # ---- training loop: one optimizer step per batch of pairs
    step, data_consumed = start.step, start.data_consumed
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            batch = dataset.batch(data_consumed,
                                  min(config.batch_size, data_limit - data_consumed))
            datums = pair_datums(batch)
            fwd_bwd = client.forward_backward_custom(
                datums, functools.partial(pair_loss, batch_size=len(batch),
                                          temperature=config.temperature),
                output="embedding", pooling=config.pooling).result()
            # info_nce is already a mean over the batch's queries.
            optim = client.optim_step(run.adam_params(step), grad_accumulation_normalization=(
                GradAccNormalization.NONE)).result()
            step += 1
            data_consumed += len(batch)
            elapsed = time.perf_counter() - t0
            num_tokens = sum(d.model_input.length for d in datums)
            run.end_step(step, data_consumed, {
                **fwd_bwd.metrics, "num_tokens": num_tokens,
                "tokens_per_s": num_tokens / elapsed, "step_time_s": elapsed,
                "learning_rate": optim.metrics["learning_rate"],
                "grad_norm": optim.metrics["grad_norm"], "epoch": data_consumed / len(dataset)})
    finally:
        run.close()
    return run.finish(step, data_consumed)
