"""Direct preference optimization (DPO) on preference pairs, resumable: rerun with the same
``log_path`` to continue.

Python::

    from training.recipes.dpo_loop import Config, main
    main(Config(log_path="./my_dpo", dataset="prefs.jsonl", beta=0.1, dcp_save_interval=10))

Command line (Hydra)::

    python -m recipes.dpo_loop log_path=./my_dpo dataset=prefs.jsonl beta=0.1

Data: OpenAI preference rows (``input.messages`` / ``preferred_output`` /
``non_preferred_output``), ``{prompt, chosen, rejected}`` or ``{chosen, rejected}``
conversations (``training.utils.preference_data``). The reference model is the policy's
starting point (``base_model``, or ``init_from_checkpoint``'s weights); its log-probs of every
pair are computed once and cached in the store (``training.utils.reference_cache``), so resuming
never recomputes them and never takes them from resumed weights.

The loop reads top to bottom: config -> data -> resume point -> trainer -> reference log-probs
-> steps -> final save -> promotion. Each step is one ``forward_backward_custom`` call on the
batch's chosen and rejected sequences, whose loss is :func:`training.utils.losses.dpo_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.sdk import CustomLossFn, Datum, GradAccNormalization
from training.utils.config import ConfigError, TrainConfig, validate_common
from training.utils.data import LongRowPolicy, SupervisedDataset, dataset_fingerprint
from training.utils.evaluation import (
    EarlyStopping,
    EvalConfig,
    eval_preference_pairs,
    evaluate_if_due,
    validate_eval,
)
from training.utils.losses import DPOLossType, dpo_loss
from training.utils.preference_data import (
    SAMPLE_PREFERENCES_PATH,
    build_preference_examples,
    load_preference_pairs,
    pair_datums,
    sequence_logprobs,
    split_eval_pairs,
)
from training.utils.reference_cache import (
    create_starting_point_client,
    load_or_compute_reference_logprobs,
    reference_identity,
)
from training.utils.run import ResumableRun, RunResult, load_run_tokenizer


@dataclass(kw_only=True)
class Config(TrainConfig, EvalConfig):
    """DPO settings: the shared :class:`TrainConfig` and :class:`EvalConfig` fields plus these
    (eval_loss is the DPO loss on the held-out pairs, with their preference accuracy and reward
    margin). The defaults run the embedded demo (tiny model, bundled preference pairs, 150
    steps: under a minute on 2 CPU cores)."""

    dataset: str = str(SAMPLE_PREFERENCES_PATH)
    """Preference data: a JSONL file or any `datasets` source in one of the three formats.
    Default: the bundled sample (400 pairs)."""
    beta: float = 0.1
    """Strength of the implicit KL penalty to the reference (> 0; the DPO paper's 0.1). Larger
    keeps the policy closer to the reference."""
    loss_type: DPOLossType = DPOLossType.sigmoid
    """'sigmoid' (DPO), 'ipo' or 'hinge' (SLiC); see training.utils.losses.dpo_loss."""
    long_row_policy: LongRowPolicy = LongRowPolicy.drop
    """Pairs with a side over max_seq_len tokens: 'drop' (counted), 'truncate' or 'error'."""
    batch_size: int = 8
    """Preference pairs per optimizer step (each is two sequences)."""
    epochs: int = 3
    learning_rate: float = 1e-4
    """Peak learning rate. 1e-4 suits the tiny demo model; real models want ~5e-7 to 1e-6 for
    full fine-tuning (DPO moves far from the reference at SFT learning rates)."""


def validate(config: Config) -> None:
    validate_common(config)
    validate_eval(config)
    if not config.beta > 0:
        raise ConfigError(f"beta must be > 0, got {config.beta} (0.1 is the usual start)")
    if config.init_from_checkpoint and config.lora_rank > 0:
        # The reference is a frozen full-weight copy of the starting point; a LoRA train state
        # holds only an adapter, which that copy cannot load.
        raise ConfigError(
            f"init_from_checkpoint={config.init_from_checkpoint!r} with lora_rank="
            f"{config.lora_rank} is not supported by dpo_loop: promote that run with "
            f"merge_lora_on_promote=true and use the promoted model as base_model, or train "
            f"full weights (lora_rank=0)")


def dpo_objective(reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
                  config: Config) -> CustomLossFn:
    """The ``forward_backward_custom`` loss of one batch: datums are the batch's chosen
    sequences, then its rejected ones (:func:`pair_datums`)."""
    def loss_fn(datums: list[Datum], logprobs: list[torch.Tensor],
                ) -> tuple[torch.Tensor, dict[str, float]]:
        logps, _ = sequence_logprobs(datums, logprobs)
        n = len(datums) // 2
        out = dpo_loss(logps[:n], logps[n:], reference_chosen, reference_rejected,
                       beta=config.beta, loss_type=config.loss_type)
        return out.loss, {**out.metrics(), "chosen_logp": float(logps[:n].detach().mean()),
                          "rejected_logp": float(logps[n:].detach().mean())}
    return loss_fn


def main(config: Config) -> RunResult:
    validate(config)

    # ---- data: validated and tokenized before any model is loaded
    tokenizer = load_run_tokenizer(config)
    pairs = load_preference_pairs(config.dataset, split=config.dataset_split)
    examples, stats = build_preference_examples(pairs, tokenizer, config.max_seq_len,
                                                config.long_row_policy)
    train_examples, eval_examples = split_eval_pairs(examples, tokenizer, config)
    dataset = SupervisedDataset(train_examples, seed=config.seed)

    # ---- resume point, or nothing left to do
    with ResumableRun(config, recipe="dpo_loop", dataset=dataset, identity={
            "long_row_policy": config.long_row_policy, "loss_type": config.loss_type,
            "beta": config.beta, "eval_fraction": config.eval_fraction,
            "early_stopping_patience": config.early_stopping_patience}) as run:
        if run.complete_row is not None:
            return run.finish_complete()
        client = run.start(summary=f"{len(dataset)} pairs [{stats.summary()}]")

        # ---- reference log-probs of every pair (held-out ones included): from the store's
        # cache, else from a frozen copy of the starting weights (never the resumed policy)
        fingerprint = run.identity["dataset_fingerprint"]
        reference = load_or_compute_reference_logprobs(
            run.store, reference_identity(config, fingerprint,
                                          long_row_policy=config.long_row_policy),
            examples, lambda: create_starting_point_client(config), config.batch_size)
        eval_reference = reference
        if config.eval_dataset:
            eval_reference = load_or_compute_reference_logprobs(
                run.store, reference_identity(
                    config, dataset_fingerprint(config.eval_dataset, config.dataset_split),
                    long_row_policy=config.long_row_policy),
                eval_examples, lambda: create_starting_point_client(config), config.batch_size)

        # ---- training loop: one optimizer step per batch of pairs
        early_stopping = EarlyStopping(config.early_stopping_patience, run.user_state)
        for batch in run.batches():
            datums = pair_datums(batch)
            fwd_bwd = client.forward_backward_custom(
                datums, dpo_objective(*reference.of(batch), config)).result()
            # The loss is already a mean over pairs: no further normalization.
            optim = client.optim_step(run.adam_params(),
                                      grad_accumulation_normalization=GradAccNormalization.none,
                                      ).result()
            metrics = {**fwd_bwd.metrics, "num_pairs": len(batch)}
            if eval_examples:
                metrics.update(evaluate_if_due(run, config, early_stopping, lambda: (
                    eval_preference_pairs(client, eval_examples, config.batch_size, lambda pairs:
                                          dpo_objective(*eval_reference.of(pairs), config)))))
            run.end_step(metrics, consumed=len(batch), optim=optim,
                         user_state=early_stopping.state(),
                         num_tokens=sum(d.model_input.length for d in datums),
                         show=("loss", "preference_accuracy", "reward_margin", "eval_loss"))
        return run.finish()
