"""Stage 5: ordering. Examples in a deterministic, resumable order: a position (examples
consumed since the start) maps to an example through a per-epoch permutation of ``seed``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)


ExampleT = TypeVar("ExampleT")


class SupervisedDataset(Generic[ExampleT]):
    """Examples in a deterministic, resumable order.

    Any example type works (:class:`SFTExample`, preference pairs, ...): the order depends only
    on how many there are.

    Position ``p`` (0-based count of examples consumed since the start of training, the
    checkpoints' ``data_consumed``) is example ``perm_e[p % n]`` of epoch ``e = p // n``, where
    ``perm_e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``. The order
    depends on nothing but ``seed`` and the examples, so a resumed run continues exactly where
    the saved one stopped; every example appears once per epoch, and batches may straddle epochs.
    """

    def __init__(self, examples: Sequence[ExampleT], seed: int) -> None:
        if not examples:
            raise ValueError("SupervisedDataset needs at least one example")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed is {seed!r}; expected a non-negative integer")
        self.examples = list(examples)
        self.seed = int(seed)
        self._cached_epoch = -1
        self._cached_perm = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Examples per epoch."""
        return len(self.examples)

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of example indices in ``epoch`` (0-based)."""
        if epoch < 0:
            raise ValueError(f"epoch is {epoch}; expected >= 0")
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, int(epoch)])
            self._cached_perm = rng.permutation(len(self.examples))
            self._cached_epoch = epoch
        return self._cached_perm

    def example_at(self, position: int) -> ExampleT:
        """Example at ``position`` (0-based count of examples consumed since training began)."""
        if position < 0:
            raise ValueError(f"position is {position}; expected >= 0")
        epoch, index = divmod(int(position), len(self.examples))
        return self.examples[int(self.permutation(epoch)[index])]

    def batch(self, data_consumed: int, batch_size: int) -> list[ExampleT]:
        """Examples at positions ``data_consumed`` .. ``data_consumed + batch_size - 1``."""
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}; expected >= 1")
        return [self.example_at(p) for p in range(data_consumed, data_consumed + batch_size)]

    def num_steps(self, epochs: int, batch_size: int, max_steps: int | None = None) -> int:
        """Optimizer steps to consume ``epochs`` epochs in batches of ``batch_size`` examples
        (``ceil(epochs * len(self) / batch_size)``; the last batch runs into the next epoch),
        capped at ``max_steps`` when given."""
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs={epochs}, batch_size={batch_size}; both must be >= 1")
        steps = -(-epochs * len(self.examples) // batch_size)
        return steps if max_steps is None else min(steps, max_steps)
