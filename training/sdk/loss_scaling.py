"""Dynamic loss scaling for fp16 mixed precision (``mixed_precision="fp16"``).

fp16 holds values down to ~6e-8 (subnormals) and up to 65504: small gradients of the activations
underflow to zero unless the loss is multiplied by a large factor before backward, and a factor
too large overflows to inf. The scale starts high, halves whenever a step's gradient overflows
(that update is skipped: weights, optimizer moments and step stay as they were) and doubles
after ``growth_interval`` good steps in a row, as ``torch.amp.GradScaler`` does. The training
client divides the factor back out when it folds normalization and clipping into the gradient,
so everything it reports (``grad_norm``) is unscaled.

bf16 has fp32's exponent range and needs none of this; it is the default where the hardware
runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DynamicLossScale"]


@dataclass
class DynamicLossScale:
    scale: float = 2.0 ** 16
    """The factor the loss is multiplied by before backward."""
    growth_interval: int = 2000
    """Good steps in a row before the scale doubles."""
    good_steps: int = 0
    """Good steps since the last overflow or growth."""

    MIN_SCALE = 1.0
    """An overflow at this scale is a truly non-finite gradient, not a scaling artefact."""

    def overflowed(self) -> bool:
        """Record a step whose gradient overflowed. Returns False when the scale was already
        at :attr:`MIN_SCALE`: lowering it cannot help, the gradient itself is not finite."""
        self.good_steps = 0
        if self.scale <= self.MIN_SCALE:
            return False
        self.scale = max(self.scale / 2.0, self.MIN_SCALE)
        return True

    def stepped(self) -> None:
        """Record a step whose update was applied."""
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def state(self) -> dict[str, float | int]:
        """What a train state stores (JSON), restored by :meth:`restore`."""
        return {"loss_scale": self.scale, "loss_scale_good_steps": self.good_steps}

    def restore(self, saved: dict) -> None:
        if "loss_scale" in saved:
            self.scale = float(saved["loss_scale"])
            self.good_steps = int(saved.get("loss_scale_good_steps", 0))
