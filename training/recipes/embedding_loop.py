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
from dataclasses import dataclass

from training.sdk import GradAccNormalization, Pooling
from training.utils.config import ConfigError, TrainConfig, validate_common
from training.utils.data import SupervisedDataset
from training.utils.embedding_data import SAMPLE_PAIRS_PATH, load_pairs, pair_datums, pair_loss
from training.utils.run import ResumableRun, RunResult, load_run_tokenizer


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Embedding settings: the shared :class:`TrainConfig` fields plus these. The defaults train
    the tiny model on the bundled pairs (40 steps; seconds on 2 CPU cores)."""

    dataset: str = str(SAMPLE_PAIRS_PATH)
    """Pairs: JSONL (or any `datasets` source) of rows with 'query' (or 'anchor'), 'positive'
    and optionally 'negative' texts. Default: the bundled question/answer pairs."""
    pooling: Pooling = Pooling.mean
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
    if not config.temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {config.temperature}")
    if config.batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2 (the other pairs of a batch are the "
                          f"negatives), got {config.batch_size}")


def main(config: Config) -> RunResult:
    validate(config)

    # ---- data: validated and tokenized before any model is loaded
    tokenizer = load_run_tokenizer(config)
    pairs, stats = load_pairs(config.dataset, tokenizer, config.max_seq_len,
                              split=config.dataset_split)
    dataset = SupervisedDataset(pairs, seed=config.seed)

    # ---- resume point, or nothing left to do
    with ResumableRun(config, recipe="embedding_loop", dataset=dataset, identity={
            "pooling": config.pooling, "temperature": config.temperature}) as run:
        if run.complete_row is not None:
            return run.finish_complete()
        client = run.start(summary=stats.summary())

        # ---- training loop: one optimizer step per batch of pairs
        for batch in run.batches():
            datums = pair_datums(batch)
            fwd_bwd = client.forward_backward_custom(
                datums, functools.partial(pair_loss, batch_size=len(batch),
                                          temperature=config.temperature),
                output="embedding", pooling=config.pooling).result()
            # info_nce is already a mean over the batch's queries.
            optim = client.optim_step(run.adam_params(), grad_accumulation_normalization=(
                GradAccNormalization.none)).result()
            run.end_step(fwd_bwd.metrics, consumed=len(batch), optim=optim,
                         num_tokens=sum(d.model_input.length for d in datums))
        return run.finish()
