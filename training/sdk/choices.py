"""Closed sets of string values: the base of every "one of these words" field and argument.

A :class:`Choice` member compares equal to its value and prints as it, so run.json, metrics
and messages keep holding plain strings, and a resumed run's identity matches one recorded
before the field was an enum. Hydra / OmegaConf parse a command-line value by member *name*
(and refuse ``Literal``), so every member's name is its value: ``drop = "drop"``. SDK methods
and configs built in Python take the plain string too (:meth:`Choice.parse`).
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

__all__ = ["Choice"]

C = TypeVar("C", bound="Choice")


class Choice(str, enum.Enum):
    """A closed set of strings (subclass it; one docstring per member says what it means)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The values, in declaration order."""
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls: type[C], value: Any, what: str) -> C:
        """``value`` (a member or its string) as a member.

        Raises:
            ValueError: naming ``what`` (the field or argument) and the choices.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{what}={value!r}: expected one of "
                             f"{', '.join(cls.values())}") from None
