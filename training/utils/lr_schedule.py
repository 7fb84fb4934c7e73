"""Learning-rate schedules as pure functions of the step, so a resumed run needs only the step."""

from __future__ import annotations

import math

from training.sdk.choices import Choice


class LRSchedule(Choice):
    """How the learning rate moves after warm-up (``lr_schedule``)."""

    constant = "constant"
    """The base learning rate throughout."""
    linear = "linear"
    """Linear decay to ``base_lr * min_lr_ratio`` at the last step."""
    cosine = "cosine"
    """Cosine decay to ``base_lr * min_lr_ratio`` at the last step."""


LR_SCHEDULES = LRSchedule.values()


def lr_at(step: int, total_steps: int, base_lr: float, schedule: LRSchedule | str = "linear",
          warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up from ``base_lr / warmup_steps`` over ``warmup_steps``, then ``constant``,
    ``linear`` decay or ``cosine`` decay down to ``base_lr * min_lr_ratio`` at the last step.
    """
    schedule = LRSchedule.parse(schedule, "lr_schedule")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)
