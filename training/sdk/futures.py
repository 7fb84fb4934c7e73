"""Futures as Tinker's clients hand them out, and the ``*_async`` twins of client methods.

Local calls run at once, in call order, so every future is already complete: ``.result()``
returns at once, ``await future`` and ``await future.result_async()`` too. The ``*_async``
methods run their synchronous twin in a worker thread (the event loop stays free) and, as in
the ``tinker`` client, awaiting them gives the same future the twin returns::

    future = await training_client.forward_backward_async(data, "cross_entropy")
    result = await future.result_async()
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["APIFuture", "async_twins", "completed"]


class APIFuture(Future[T]):
    """A completed :class:`concurrent.futures.Future` that can also be awaited."""

    async def result_async(self, timeout: float | None = None) -> T:
        return self.result(timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


def completed(value: T) -> APIFuture[T]:
    """A future that already holds ``value``."""
    future: APIFuture[T] = APIFuture()
    future.set_result(value)
    return future


class AwaitableSelf:
    """Mixin for clients that Tinker returns as futures of themselves
    (``create_lora_training_client(...)`` is a client, ``.result()`` of it and ``await`` of it
    are the same client)."""

    def result(self, timeout: float | None = None) -> Any:
        return self

    async def result_async(self, timeout: float | None = None) -> Any:
        return self

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result_async().__await__()


def async_twins(*names: str) -> Callable[[type], type]:
    """Class decorator: add ``<name>_async`` for each method ``name``, running it in a worker
    thread and returning what it returns."""
    def decorate(cls: type) -> type:
        for name in names:
            sync = getattr(cls, name)

            @functools.wraps(sync)
            async def twin(self: Any, *args: Any, _sync: Callable = sync, **kwargs: Any) -> Any:
                return await asyncio.to_thread(_sync, self, *args, **kwargs)

            twin.__name__ = twin.__qualname__ = f"{name}_async"
            twin.__doc__ = f"Async :meth:`{name}` (runs in a worker thread)."
            setattr(cls, f"{name}_async", twin)
        return cls
    return decorate
