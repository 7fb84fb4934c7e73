"""Data parallelism across processes: the one home of process-group state.

A recipe launched with ``torchrun --nproc_per_node=N`` runs the same loop in N processes. Every
rank loads the same data in the same order and makes the same client calls; the training client
splits each batch's datums across ranks, FSDP2 (``fully_shard``) shards weights, gradients and
optimizer state, and the gradient reduction *sums* (the losses are sums; ``optim_step``
normalizes by the global token or sequence count that every rank knows). Files of the run
(``checkpoints.jsonl``, metrics, run.json, promotions, sampler snapshots) are written by rank 0
alone; train states are sharded DCP checkpoints that every rank writes its part of.

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) nothing here starts a process group
and every helper is a no-op for a world of one.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT_ENV = "HOMEFIRE_DIST_TIMEOUT_S"
"""Seconds a collective waits for the other ranks before failing (default 1800)."""


class RankLostError(RuntimeError):
    """Another rank died or stopped answering: this run cannot go on."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world() -> World:
    """The current world: the process group's when one is running, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_from_env(device: torch.device) -> World:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Idempotent; a no-op for a single process. The backend is gloo on CPU and nccl on CUDA (each
    rank then uses ``cuda:LOCAL_RANK``).
    """
    if launched_world_size() <= 1 or dist.is_initialized():
        return world()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout,
                                device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return world()


def shutdown() -> None:
    """Leave the process group once every rank is done (a no-op for one process).

    A process that exits with its gloo group alive can abort at interpreter shutdown ("terminate
    called without an active exception", SIGABRT): gloo's worker threads outlive the
    interpreter. Call it after the last collective, on success only (a rank that failed must
    not wait in a barrier for the others).
    """
    global _checkpoint_group
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _checkpoint_group = None


_checkpoint_group: Any = None


def checkpoint_group() -> Any:
    """A gloo process group of its own for background (async) checkpoint writes, whose
    collectives must not interleave with training's on the default group; None for one process.
    Created on first use, which every rank reaches together (their first save)."""
    global _checkpoint_group
    if not world().distributed:
        return None
    if _checkpoint_group is None:
        with collective("creating the checkpoint process group"):
            _checkpoint_group = dist.new_group(backend="gloo")
    return _checkpoint_group


def rank_device(device: torch.device) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for CUDA under torchrun."""
    w = world()
    if device.type == "cuda" and w.distributed and device.index is None:
        return torch.device("cuda", w.local_rank)
    return device


def barrier() -> None:
    if world().distributed:
        with collective("a barrier"):
            dist.barrier()


def broadcast_object(obj: T | None, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (pickled)."""
    if not world().distributed:
        return obj  # type: ignore[return-value]
    box = [obj]
    with collective("broadcasting an object"):
        dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order."""
    w = world()
    if not w.distributed:
        return [obj]
    out: list[Any] = [None] * w.world_size
    with collective("gathering objects"):
        dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    An exception raised by ``fn`` is raised on every rank, so all of them stop with rank 0's
    error instead of the others hanging in their next collective.
    """
    w = world()
    if not w.distributed:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if w.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}")
    error, result = broadcast_object((error, result) if w.is_main else None)
    if error is not None:
        raise error
    return result


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:
        return False
    return True


def shard_range(count: int, w: World | None = None) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous share of ``count`` items (sizes differ by at
    most one, earlier ranks take the extra)."""
    w = w or world()
    base, extra = divmod(count, w.world_size)
    start = w.rank * base + min(w.rank, extra)
    return start, start + base + (1 if w.rank < extra else 0)


def shard_model(model: torch.nn.Module, device: torch.device,
                autocast_dtype: torch.dtype | None) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 across the ranks (a no-op for one process).

    Each decoder layer is its own FSDP unit (its weights are gathered just before it runs), the
    root holds the rest (embeddings, final norm, lm_head). Gradients are summed across ranks,
    not averaged, because the client's losses are sums over the global batch. On CUDA the
    parameters are gathered in bf16 when mixed precision is on (gradients reduce in fp32); on
    CPU they stay fp32 and autocast runs the matmuls in bf16, as in a single process.
    """
    if not world().distributed:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if device.type == "cuda" and autocast_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=autocast_dtype,
                                                   reduce_dtype=torch.float32)
    for layer in _decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # gloo has no PREMUL_SUM; a plain SUM is what we want anyway.
            module.set_force_sum_reduction_for_comms(True)
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (``model.model.layers``)."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


_PEER_LOST_HINTS = ("connection closed", "connection reset", "broken pipe", "timed out",
                    "timeout", "peer", "socket", "nccl communicator was aborted")


class collective:  # noqa: N801 (used as a context manager, named like one)
    """Turn a failed collective into a :class:`RankLostError` that says what to do next.

    When one rank dies (killed, out of memory, a node lost), the others see a gloo/nccl error
    in their next collective (or torchrun stops them). The message names the operation and
    the way back: rerun the same launch command, which resumes from the last complete
    checkpoint (a save that a lost rank interrupted is never recorded).
    """

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> collective:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, RankLostError) or not world().distributed:
            return False
        dist_error = getattr(dist, "DistError", ())
        text = str(exc).lower()
        if isinstance(exc, dist_error) or (isinstance(exc, RuntimeError)
                                           and any(h in text for h in _PEER_LOST_HINTS)):
            raise RankLostError(
                f"rank {world().rank} lost contact with another rank while {self.what} "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if text else ''}). "
                f"Another process of this run died or stopped answering; this run stops here. "
                f"Rerun the same launch command to resume from the last complete checkpoint "
                f"in checkpoints.jsonl (interrupted saves are never recorded).") from exc
        return False
