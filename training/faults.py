"""Fault injection for crash-safety tests: ``HOMEFIRE_FAULT_POINT=<point>:<n>``.

A TEST HOOK, not a feature. When the environment variable is set, the process kills itself
with SIGKILL the ``n``-th time it reaches the named point, so a test can crash a real run
inside a narrow window (mid-save, mid-append, mid-promotion) deterministically instead of
hoping a timer lands there. When it is unset, :func:`fault_point` costs one ``is None`` check.

Points (each placed where a crash is most damaging):

``step``
    after a step's optimizer update and metrics row, before its checkpoint is saved.
``commit.state`` / ``commit.sampler`` / ``commit.model``
    a train state, sampler snapshot or promoted model has all its files written but not its
    ``meta.json`` (the entry is incomplete).
``checkpoints.append``
    half of a ``checkpoints.jsonl`` row has been written and flushed (a torn line).

Under torchrun every rank inherits the variable; ``HOMEFIRE_FAULT_RANK=<r>`` arms it in rank
``r`` alone (a lost rank).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable

ENV_VAR = "HOMEFIRE_FAULT_POINT"
RANK_ENV_VAR = "HOMEFIRE_FAULT_RANK"

_spec = os.environ.get(ENV_VAR) or None
_hits: Counter[str] = Counter()


def _parse(spec: str) -> tuple[str, int]:
    point, _, count = spec.rpartition(":")
    if not point or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV_VAR}={spec!r}: expected '<point>:<n>' with n >= 1, e.g. "
                         f"'commit.state:3'")
    return point, int(count)


_armed_here = os.environ.get(RANK_ENV_VAR) in (None, "", os.environ.get("RANK", "0"))
_target = _parse(_spec) if _spec is not None and _armed_here else None


def fault_point(name: str, before_kill: Callable[[], None] | None = None) -> None:
    """SIGKILL this process if ``name`` is the armed point and this is its ``n``-th hit.

    ``before_kill`` runs just before the kill (e.g. to write half a line).
    """
    if _target is None:
        return
    if name != _target[0]:
        return
    _hits[name] += 1
    if _hits[name] == _target[1]:
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), signal.SIGKILL)
