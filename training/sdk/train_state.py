"""Train states on disk: what a DCP checkpoint of a trainer holds, the background copy a
save writes from, and the per-rank checksums that a load verifies.

A train state is a directory of DCP shards (``__<rank>_<n>.distcp`` and ``.metadata``) holding
the model (the adapter only, for LoRA), the optimizer, the trainer's step and each rank's
pickled user state; ``checksums.rank<r>.json`` beside them lists the XXH3-128 of every file
rank ``r`` wrote.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from training.sdk import distributed
from training.sdk.distributed import collective
from training.sdk.store import StoreError

__all__ = ["STATE_CHECKSUMS", "StagingBuffers", "StateCorruptError", "dcp_call",
           "train_state_dict", "user_state_key", "verify_state_checksums",
           "write_state_checksums"]

# DCP warns on every single-process save/load (no process group) that it assumes one process:
# that is this trainer's normal case. Filtered process-wide because background saves run in
# DCP's own thread, outside any catch_warnings block.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                        "uninitialized", category=UserWarning)


def train_state_dict(model: torch.nn.Module, lora: bool) -> dict[str, Any]:
    """What a train state holds: every weight for full fine-tuning (trainable or, in a frozen
    reference client, not), only the adapter for LoRA (the frozen base is reloaded from
    base_model).

    DCP's ``ignore_frozen_params`` alone would keep a tied ``lm_head`` of a frozen base, because
    tied parameters are deduplicated out of ``named_parameters()``; filter on the full list.
    """
    if not lora:
        return get_model_state_dict(model)
    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    trainable = {name for name, p in model.named_parameters(remove_duplicate=False)
                 if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


def user_state_key(rank: int) -> str:
    """Where a rank's user state (data position, RNG states) lives in a train state: rank 0's
    under the single-process name, so states saved by one process and by N read alike."""
    return "user_state" if rank == 0 else f"user_state.rank{rank}"


def dcp_call(fn: Callable[..., Any], state: dict[str, Any], directory: str, what: str,
              process_group: Any = None) -> None:
    """Run a DCP save/load on a local directory, turning its BaseException into a StoreError.

    Safe in a background thread: no ``warnings.catch_warnings`` (not thread-safe); the module's
    filter silences DCP's single-process warning.
    """
    try:
        with collective(what):
            if fn is dcp.save:
                fn(state, storage_writer=dcp.FileSystemWriter(directory),
                   process_group=process_group)
            else:
                fn(state, storage_reader=dcp.FileSystemReader(directory),
                   process_group=process_group)
    except CheckpointException as e:  # derives from BaseException, not Exception
        if fn is dcp.save:
            raise StoreError(f"{what} failed in {directory}: {_first_line(e)}"
                             f"{_disk_full_hint(directory)}") from e
        raise StoreError(f"{what} failed in {directory}: {_first_line(e)}; the checkpoint is "
                         f"corrupt or incomplete: delete it or use an earlier one") from e
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        if isinstance(e, distributed.RankLostError):
            raise
        raise StoreError(f"{what} failed in {directory}: {type(e).__name__}: {e}"
                         f"{_disk_full_hint(directory) if fn is dcp.save else ''}") from e


def _disk_full_hint(directory: str) -> str:
    """torch's writer reports a full disk as ``unexpected pos 704 vs 598``: say what it means
    when the filesystem is (almost) out of space."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    if free >= 1 << 20:
        return ""
    return (f" (the filesystem holding it has {free} bytes free: No space left on device)")


class StagingBuffers:
    """CPU buffers a background save copies the train state into, kept from one save to the
    next (fresh buffers would page-fault on every byte; DCP's caching stager pins memory, which
    needs an accelerator). One save is in flight at a time (:meth:`TrainingClient.save_state`
    waits for the previous one), so reuse is safe."""

    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None
        self._layout: Any = None

    def copy(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        layout = _layout_of(state_dict)
        if self._buffers is None or layout != self._layout:
            self._buffers = _create_cpu_state_dict(state_dict)
            self._layout = layout
        return _copy_state_dict(state_dict, self._buffers)


def _layout_of(tree: Any) -> Any:
    """The keys, shapes and dtypes of a (nested) state dict: when the buffers still fit."""
    if isinstance(tree, dict):
        return tuple((k, _layout_of(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return tuple(_layout_of(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return (tuple(tree.shape), tree.dtype, type(tree).__name__)
    return type(tree).__name__


STATE_CHECKSUMS = "checksums.rank{rank}.json"
"""Per rank, the XXH3-128 of every file that rank wrote into a train state (DCP names them
``__<rank>_<n>.distcp``; rank 0 also writes ``.metadata``)."""


class StateCorruptError(StoreError):
    """A train state's file does not match the checksum taken when it was saved (or is
    missing): it is never loaded."""


def _file_xxh3(path: str) -> str:
    # Hashing a memory map reads the page cache in place: no copy into Python buffers
    # (chunked reads took ~3x longer on a 127 MB state).
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_128(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return xxhash.xxh3_128(mapped).hexdigest()


def write_state_checksums(directory: str, rank: int) -> None:
    """Record the checksum of each file ``rank`` wrote into the train state ``directory``
    (before the entry is closed and committed: a checksum file is part of the entry)."""
    mine = sorted(f for f in os.listdir(directory)
                  if f.startswith(f"__{rank}_") or (rank == 0 and f == ".metadata"))
    payload = {"algorithm": "xxh3_128", "files": {f: _file_xxh3(os.path.join(directory, f))
                                                  for f in mine}}
    with open(os.path.join(directory, STATE_CHECKSUMS.format(rank=rank)), "w") as out:
        json.dump(payload, out, indent=1, sort_keys=True)


def verify_state_checksums(directory: str, what: str) -> None:
    """Check every file a train state's checksum files list.

    A state saved before checksums existed (no checksum file) is loaded unchecked.

    Raises:
        StateCorruptError: a listed file is missing or its bytes changed since the save.
    """
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("checksums.rank") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                listed = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateCorruptError(f"{what}: its checksum file {name} is unreadable ({e})") \
                from None
        for file, expected in listed.items():
            path = os.path.join(directory, file)
            if not os.path.exists(path):
                raise StateCorruptError(f"{what}: file {file} is missing (listed in {name})")
            if _file_xxh3(path) != expected:
                raise StateCorruptError(f"{what}: file {file} does not match the checksum "
                                        f"taken when it was saved: the checkpoint is corrupt")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
