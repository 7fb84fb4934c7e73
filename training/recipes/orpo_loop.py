"""Odds-ratio preference optimization (ORPO) on preference pairs, resumable: rerun with the same
``log_path`` to continue.

Python::

    from training.recipes.orpo_loop import Config, main
    main(Config(log_path="./my_orpo", dataset="prefs.jsonl", orpo_lambda=0.1))

Command line (Hydra)::

    python -m recipes.orpo_loop log_path=./my_orpo dataset=prefs.jsonl orpo_lambda=0.1

ORPO (Hong et al., 2024) needs no reference model: its loss is the NLL of the chosen answer
(SFT) plus ``orpo_lambda`` times an odds-ratio penalty that favours the chosen answer over the
rejected one (:func:`training.utils.losses.orpo_loss`), so it can start from a base model
without a separate SFT stage. Data formats, checkpoints and resume are those of the DPO recipe
(``training.recipes.dpo_loop``).

The loop reads top to bottom: config -> data -> resume point -> trainer -> steps -> final save
-> promotion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.sdk import CustomLossFn, Datum, GradAccNormalization
from training.utils.config import ConfigError, TrainConfig, validate_common
from training.utils.data import LongRowPolicy, SupervisedDataset
from training.utils.evaluation import (
    EarlyStopping,
    EvalConfig,
    eval_preference_pairs,
    evaluate_if_due,
    validate_eval,
)
from training.utils.losses import orpo_loss
from training.utils.preference_data import (
    SAMPLE_PREFERENCES_PATH,
    build_preference_examples,
    load_preference_pairs,
    pair_datums,
    sequence_logprobs,
    split_eval_pairs,
)
from training.utils.run import ResumableRun, RunResult, load_run_tokenizer


@dataclass(kw_only=True)
class Config(TrainConfig, EvalConfig):
    """ORPO settings: the shared :class:`TrainConfig` and :class:`EvalConfig` fields plus these
    (eval_loss is the ORPO loss on the held-out pairs). The defaults run the embedded demo
    (tiny model, bundled preference pairs)."""

    dataset: str = str(SAMPLE_PREFERENCES_PATH)
    """Preference data: a JSONL file or any `datasets` source in one of the three formats.
    Default: the bundled sample (400 pairs)."""
    orpo_lambda: float = 0.5
    """Weight of the odds-ratio term against the SFT term (> 0; the paper uses 0.1 to 1)."""
    long_row_policy: LongRowPolicy = LongRowPolicy.drop
    """Pairs with a side over max_seq_len tokens: 'drop' (counted), 'truncate' or 'error'."""
    batch_size: int = 8
    """Preference pairs per optimizer step (each is two sequences)."""
    learning_rate: float = 1e-3
    """Peak learning rate. 1e-3 suits the tiny demo model; real models want ~5e-6 to 8e-6
    (the paper's) for full fine-tuning."""


def validate(config: Config) -> None:
    validate_common(config)
    validate_eval(config)
    if not config.orpo_lambda > 0:
        raise ConfigError(f"orpo_lambda must be > 0, got {config.orpo_lambda} (the paper uses "
                          f"0.1 to 1)")


def orpo_objective(config: Config) -> CustomLossFn:
    """The ``forward_backward_custom`` loss of one batch: datums are the batch's chosen
    sequences, then its rejected ones (:func:`pair_datums`)."""
    def loss_fn(datums: list[Datum], logprobs: list[torch.Tensor],
                ) -> tuple[torch.Tensor, dict[str, float]]:
        logps, num_tokens = sequence_logprobs(datums, logprobs)
        n = len(datums) // 2
        out = orpo_loss(logps[:n], logps[n:], num_tokens[:n], num_tokens[n:],
                        orpo_lambda=config.orpo_lambda)
        return out.loss, out.metrics()
    return loss_fn


def main(config: Config) -> RunResult:
    validate(config)

    # ---- data: validated and tokenized before any model is loaded
    tokenizer = load_run_tokenizer(config)
    pairs = load_preference_pairs(config.dataset, split=config.dataset_split)
    examples, stats = build_preference_examples(pairs, tokenizer, config.max_seq_len,
                                                config.long_row_policy)
    examples, eval_examples = split_eval_pairs(examples, tokenizer, config)
    dataset = SupervisedDataset(examples, seed=config.seed)

    # ---- resume point, or nothing left to do
    with ResumableRun(config, recipe="orpo_loop", dataset=dataset, identity={
            "long_row_policy": config.long_row_policy, "orpo_lambda": config.orpo_lambda,
            "eval_fraction": config.eval_fraction,
            "early_stopping_patience": config.early_stopping_patience}) as run:
        if run.complete_row is not None:
            return run.finish_complete()
        client = run.start(summary=f"{len(dataset)} pairs [{stats.summary()}]")

        # ---- training loop: one optimizer step per batch of pairs
        loss_fn = orpo_objective(config)
        early_stopping = EarlyStopping(config.early_stopping_patience, run.user_state)
        for batch in run.batches():
            datums = pair_datums(batch)
            fwd_bwd = client.forward_backward_custom(datums, loss_fn).result()
            # The loss is already a mean over pairs: no further normalization.
            optim = client.optim_step(run.adam_params(),
                                      grad_accumulation_normalization=GradAccNormalization.none,
                                      ).result()
            metrics = {**fwd_bwd.metrics, "num_pairs": len(batch)}
            if eval_examples:
                metrics.update(evaluate_if_due(run, config, early_stopping, lambda: (
                    eval_preference_pairs(client, eval_examples, config.batch_size,
                                          lambda _: loss_fn))))
            run.end_step(metrics, consumed=len(batch), optim=optim,
                         user_state=early_stopping.state(),
                         num_tokens=sum(d.model_input.length for d in datums),
                         show=("loss", "preference_accuracy", "log_odds_ratio", "eval_loss"))
        return run.finish()
