"""Held-out evaluation: a validation split and the loss on it, logged with the step's metrics.

The split is drawn from the seed alone (the same rows on every rerun, so a resumed run reports
the same validation loss an uninterrupted one would), and evaluation only reads the weights
(``forward``), so it never changes what the run trains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from training.utils.config import ConfigError

__all__ = ["EarlyStopping", "EvalConfig", "eval_due", "eval_loss", "eval_preference_pairs",
           "evaluate_if_due", "hold_out", "validate_eval"]


@dataclass(kw_only=True)
class EvalConfig:
    """Validation fields of the recipes that have them (SFT, DPO, ORPO)."""

    eval_dataset: str | None = None
    """Rows to report the validation loss on (same formats as dataset); default: none, or the
    eval_fraction held out of dataset."""
    eval_fraction: float = 0.0
    """Without eval_dataset: this fraction of the training rows, drawn by seed, is held out
    for validation instead of trained on (0 = none)."""
    eval_every: int = 0
    """Report eval_loss (metrics.jsonl) every this many steps, and always at the last step;
    0: at the last step only. Needs eval_dataset or eval_fraction."""
    early_stopping_patience: int = 0
    """Stop when eval_loss has not improved for this many evaluations in a row (0 = never);
    the final checkpoint is then at that step, and a rerun reports the run complete."""


def validate_eval(config: EvalConfig) -> None:
    """The checks of :class:`EvalConfig`'s fields, naming the field."""
    if config.early_stopping_patience < 0:
        raise ConfigError(f"early_stopping_patience must be >= 0, got "
                          f"{config.early_stopping_patience}")
    if config.early_stopping_patience and not (config.eval_dataset or config.eval_fraction):
        raise ConfigError("early_stopping_patience needs a validation set: set eval_dataset or "
                          "eval_fraction (and eval_every)")
    if config.eval_every < 0:
        raise ConfigError(f"eval_every must be >= 0, got {config.eval_every}")
    if config.eval_dataset and config.eval_fraction:
        raise ConfigError("set eval_dataset or eval_fraction, not both")
    if not 0 <= config.eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")

ExampleT = TypeVar("ExampleT")


def hold_out(examples: Sequence[ExampleT], fraction: float, seed: int,
             ) -> tuple[list[ExampleT], list[ExampleT]]:
    """``(train, eval)``: ``round(fraction * len(examples))`` examples (at least one when
    ``fraction > 0``) drawn by ``seed`` for evaluation, the rest for training, both in their
    original order.

    Raises:
        ValueError: ``fraction`` outside [0, 1), or nothing left to train on.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(examples), []
    count = max(1, round(fraction * len(examples)))
    if count >= len(examples):
        raise ValueError(f"eval_fraction={fraction} of {len(examples)} examples leaves none to "
                         f"train on")
    held = set(np.random.default_rng([seed, 0xE7A1]).choice(len(examples), count,
                                                             replace=False).tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def eval_due(step: int, every: int, total_steps: int) -> bool:
    """Whether step ``step`` (1-based, the one just trained) is evaluated: every ``every``
    steps (0: never in between) and always at the last step."""
    return step >= total_steps or (every > 0 and step % every == 0)


def eval_loss(client: Any, datums: Sequence[Any], batch_size: int,
              loss_fn: str = "cross_entropy") -> float:
    """The mean loss per trained token of ``datums`` under the client's current weights
    (``forward`` in batches of ``batch_size``: no gradients, no update)."""
    loss_sum = tokens = 0.0
    for start in range(0, len(datums), batch_size):
        out = client.forward(list(datums[start:start + batch_size]), loss_fn).result()
        loss_sum += out.metrics["loss:sum"]
        tokens += out.metrics["num_loss_tokens"]
    return loss_sum / max(tokens, 1.0)


def eval_preference_pairs(client: Any, examples: Sequence[Any], batch_size: int,
                          loss_for: Callable[[Sequence[Any]], Callable[..., Any]],
                          ) -> dict[str, float]:
    """A preference recipe's loss and metrics on held-out pairs, prefixed ``eval_``: each
    batch's chosen and rejected sequences scored by ``forward`` (no gradients, no update) and
    handed to ``loss_for(batch)``, the recipe's own ``forward_backward_custom`` loss; the
    values are means over pairs."""
    from training.utils.preference_data import pair_datums

    totals: dict[str, float] = {}
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start:start + batch_size])
        datums = pair_datums(batch)
        output = client.forward(datums).result()
        logprobs = [o["logprobs"].to_torch().float() for o in output.loss_fn_outputs]
        with torch.no_grad():
            loss, metrics = loss_for(batch)(datums, logprobs)
        for key, value in {"loss": float(loss), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + float(value) * len(batch)
    return {f"eval_{key}": value / max(len(examples), 1) for key, value in totals.items()}


def evaluate_if_due(run: Any, config: EvalConfig, early_stopping: EarlyStopping,
                    evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The step's validation metrics (``evaluate()``, which holds ``eval_loss``) when the step
    now running is due for one, else none; ends the run after it (``run.stop``) when early
    stopping says so."""
    if not eval_due(run.step + 1, config.eval_every, run.total_steps):
        return {}
    metrics = evaluate()
    stop = early_stopping.update(metrics["eval_loss"])
    if stop:
        run.stop(stop)
    return metrics


class EarlyStopping:
    """Counts evaluations without a new best ``eval_loss``; :meth:`update` says when
    ``patience`` of them came in a row. Its :meth:`state` goes into each checkpoint's user state
    so a resumed run counts on where the saved one was."""

    def __init__(self, patience: int, saved: dict[str, Any] | None = None) -> None:
        self.patience = patience
        saved = (saved or {}).get("early_stopping", {})
        self.best: float = saved.get("best", float("inf"))
        self.without_improvement: int = saved.get("without_improvement", 0)

    def update(self, eval_loss: float) -> str | None:
        """Record an evaluation; returns why to stop (or None to go on)."""
        if eval_loss < self.best:
            self.best, self.without_improvement = eval_loss, 0
            return None
        self.without_improvement += 1
        if self.patience > 0 and self.without_improvement >= self.patience:
            return (f"eval_loss has not improved on {self.best:.6g} for "
                    f"{self.without_improvement} evaluations (early_stopping_patience="
                    f"{self.patience})")
        return None

    def state(self) -> dict[str, Any]:
        return {"early_stopping": {"best": self.best,
                                   "without_improvement": self.without_improvement}}
