"""Held-out evaluation: a validation split and the loss on it, logged with the step's metrics.

The split is drawn from the seed alone (the same rows on every rerun, so a resumed run reports
the same validation loss an uninterrupted one would), and evaluation only reads the weights
(``forward``), so it never changes what the run trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["EarlyStopping", "eval_due", "eval_loss", "hold_out"]

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
