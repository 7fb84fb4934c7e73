"""Reward functions for RL recipes: built-ins and a ``module:function`` loader.

A reward function scores one completion of one prompt row::

    def reward(row: dict, completion: str) -> float: ...

``row`` is the prompt row as read from the data (``messages`` plus every other field, e.g. a
ground-truth ``answer``); ``completion`` is the sampled text, decoded without special tokens.
Higher is better; GRPO only uses differences within a prompt's group, so the scale is free.

Name one with :func:`load_reward_fn`: a built-in (``exact_match``, ``numeric_answer``,
``regex_match``, ``regex_coverage``) or your own as ``package.module:function``. A function may
declare the row fields it reads in a ``required_fields`` attribute; the recipe then checks every
row before any model is loaded and names the first row that lacks one.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

RewardFn = Callable[[dict[str, Any], str], float]
"""``(row, completion) -> reward``."""


class RewardError(ValueError):
    """A reward function cannot be loaded or returned something unusable; the message says which
    and what to do."""


_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _requires(*fields: str) -> Callable[[RewardFn], RewardFn]:
    def mark(fn: RewardFn) -> RewardFn:
        fn.required_fields = fields  # type: ignore[attr-defined]
        return fn
    return mark


@_requires("answer")
def exact_match(row: dict[str, Any], completion: str) -> float:
    """1.0 if the completion, stripped of surrounding whitespace, equals ``row["answer"]``
    (stripped, compared as text), else 0.0."""
    return float(completion.strip() == str(row["answer"]).strip())


@_requires("answer")
def numeric_answer(row: dict[str, Any], completion: str) -> float:
    """1.0 if the last number in the completion equals ``row["answer"]`` (a number or numeric
    string) to a relative tolerance of 1e-6, else 0.0. Thousands separators (``1,024``) are
    accepted; a completion with no number scores 0."""
    numbers = _NUMBER.findall(completion)
    if not numbers:
        return 0.0
    try:
        got = float(numbers[-1].replace(",", ""))
    except ValueError:  # e.g. "1." followed by garbage that the pattern still matched
        return 0.0
    expected = float(str(row["answer"]).replace(",", ""))
    return float(math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9))


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@_requires("pattern")
def regex_match(row: dict[str, Any], completion: str) -> float:
    """1.0 if the whole stripped completion matches the regular expression ``row["pattern"]``
    (``re.fullmatch``), else 0.0: a format check."""
    return float(_compile(row["pattern"]).fullmatch(completion.strip()) is not None)


@_requires("pattern")
def regex_coverage(row: dict[str, Any], completion: str) -> float:
    """Fraction (0..1) of the completion's characters inside non-overlapping matches of
    ``row["pattern"]`` (``re.finditer``); an empty completion scores 0.

    A dense format reward: partial compliance scores partially, so even a model that rarely
    complies fully gets a signal in most groups.
    """
    if not completion:
        return 0.0
    covered = sum(m.end() - m.start() for m in _compile(row["pattern"]).finditer(completion))
    return covered / len(completion)


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "numeric_answer": numeric_answer,
    "regex_match": regex_match,
    "regex_coverage": regex_coverage,
}
"""Reward functions available by bare name."""


def load_reward_fn(spec: str) -> RewardFn:
    """The reward function named by ``spec``: a key of :data:`BUILTIN_REWARDS` or
    ``package.module:function`` (importable from the working directory or the installed
    packages).

    Raises:
        RewardError: unknown built-in, malformed spec, module not importable, no such
            attribute, or not callable; the message says what to fix.
    """
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise RewardError(f"reward_fn={spec!r}: not a built-in reward (built-ins: "
                          f"{', '.join(BUILTIN_REWARDS)}) and not 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward_fn={spec!r}: expected 'package.module:function', e.g. "
                          f"'my_rewards:score'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward_fn={spec!r}: cannot import module {module_name!r} ({e}); "
                          f"make it importable (run from its directory or add it to "
                          f"PYTHONPATH)") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise RewardError(f"reward_fn={spec!r}: module {module_name!r} "
                              f"({getattr(module, '__file__', '?')}) has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(f"reward_fn={spec!r}: {attr!r} in {module_name!r} is a "
                          f"{type(fn).__name__}, not a function (row, completion) -> float")
    return fn  # type: ignore[return-value]


def required_fields(fn: RewardFn) -> tuple[str, ...]:
    """The row fields ``fn`` declares it reads (its ``required_fields`` attribute, or none)."""
    return tuple(getattr(fn, "required_fields", ()))


def call_reward(fn: RewardFn, row: dict[str, Any], completion: str, where: str) -> float:
    """``fn(row, completion)`` as a float, refusing what GRPO cannot use.

    Raises:
        RewardError: the function raised, or returned a non-number or a NaN/inf; the message
            names the row (``where``, e.g. ``prompts.jsonl:7``) and the function.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        value = fn(row, completion)
    except Exception as e:
        raise RewardError(f"{where}: reward function {name} raised {type(e).__name__}: {e} "
                          f"(completion {completion[:80]!r}); fix the function or the row") from e
    if not isinstance(value, (int, float)) or not math.isfinite(value):  # a bool is 0/1: fine
        raise RewardError(f"{where}: reward function {name} returned {value!r}; it must return "
                          f"a finite float")
    return float(value)
