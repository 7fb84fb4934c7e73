"""Reference log-probs of preference pairs: computed once, cached in the checkpoint store.

DPO compares the policy with the model it started from (the *reference*). The reference never
changes during a run, so its log-prob of every chosen and rejected completion is computed once,
before the first step, and kept as one file under the store::

    {storage_root}/cache/reference_logprobs/ref-<key>.pt

``key`` hashes everything the values depend on: the dataset's contents, the reference weights
(base model, plus the init checkpoint when ``init_from_checkpoint`` is set), the tokenizer,
``max_seq_len``, the long-row policy and the numerics (device type, autocast dtype). A resumed or
repeated run with the same key loads the file instead of running the reference again, and a
resumed run never derives the reference from its resumed (already trained) weights: the values
come from the file, or from a fresh frozen copy of the starting weights.

The reference model is the policy's starting point: ``base_model`` (a frozen client from
``ServiceClient.create_reference_client``), or the weights of ``init_from_checkpoint`` when the
run starts from a checkpoint (e.g. DPO after SFT), loaded the way the policy loads them
(:func:`create_starting_point_client`). A file whose key names a local model directory is not
invalidated when that directory's weights change in place: give changed weights a new path.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.sdk import distributed
from training.sdk.service_client import ServiceClient
from training.sdk.store import CheckpointStore, StoreError
from training.sdk.training_client import TrainingClient, resolve_autocast_dtype, resolve_device
from training.utils.config import TrainConfig, tokenizer_name
from training.utils.preference_data import PreferenceExample, pair_datums, sequence_logprobs

logger = logging.getLogger(__name__)

REFERENCE_CACHE_NAMESPACE = "reference_logprobs"
"""Store cache namespace of the files (``{storage_root}/cache/reference_logprobs/``)."""

# Bump when what the file holds, or how its values are computed, changes.
_FORMAT_VERSION = 1


@dataclass
class ReferenceLogprobs:
    """Reference log-probs of every pair, indexed by :attr:`PreferenceExample.index`."""

    chosen: torch.Tensor
    """``[pairs]`` float32: summed log-prob (nats) of each chosen completion."""
    rejected: torch.Tensor
    """``[pairs]`` float32: same for each rejected completion."""
    path: str
    """The cache file in the store."""
    computed: bool
    """True if this call ran the reference model; False if the values came from the cache."""

    def of(self, batch: Sequence[PreferenceExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` reference log-probs of a batch, each ``[len(batch)]``."""
        index = torch.tensor([example.index for example in batch], dtype=torch.long)
        return self.chosen[index], self.rejected[index]


def reference_cache_key(identity: dict[str, Any]) -> str:
    """File name of the cache for ``identity`` (a JSON-able dict of what the values depend on):
    ``ref-`` + the first 24 hex digits of the SHA-256 of its canonical JSON."""
    payload = json.dumps({"format_version": _FORMAT_VERSION, **identity}, sort_keys=True)
    return "ref-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


def load_or_compute_reference_logprobs(
        store: CheckpointStore, identity: dict[str, Any], examples: Sequence[PreferenceExample],
        make_reference_client: Callable[[], TrainingClient], batch_size: int,
) -> ReferenceLogprobs:
    """The reference log-probs of ``examples``: from the store's cache, or computed and cached.

    Args:
        store: the checkpoint store that holds the cache.
        identity: what the values depend on (see the module docstring); hashed into the key and
            stored in the file, which must match it when read.
        examples: all pairs of the dataset, ``examples[i].index == i``.
        make_reference_client: builds the frozen reference client; called only on a cache miss,
            and the client is dropped (freeing its weights) before this returns.
        batch_size: pairs per reference forward pass (two sequences each).

    Raises:
        StoreError: the cache file exists but is unreadable, or holds other values than
            ``identity`` asks for; the message names the file: delete it to recompute.
    """
    if any(example.index != i for i, example in enumerate(examples)):
        raise ValueError("examples must be the whole dataset in order (examples[i].index == i)")
    path = store.cache_path(REFERENCE_CACHE_NAMESPACE, f"{reference_cache_key(identity)}.pt")
    # Under torchrun rank 0 decides (a rank that saw rank 0's fresh file would skip the forward
    # passes the others wait for) and alone writes the file.
    main = distributed.world().is_main
    data = distributed.on_main(lambda: store.read_bytes(path))
    if data is not None:
        chosen, rejected = _decode(data, store.url(path), identity, len(examples))
        if main:
            print(f"reference log-probs of {len(examples)} pairs: loaded from "
                  f"{store.url(path)}", flush=True)
        return ReferenceLogprobs(chosen=chosen, rejected=rejected, path=store.url(path),
                                 computed=False)

    t0 = time.perf_counter()
    if main:
        print(f"reference log-probs of {len(examples)} pairs: computing (once; cached at "
              f"{store.url(path)})", flush=True)
    chosen, rejected = compute_reference_logprobs(make_reference_client(), examples, batch_size)
    buffer = io.BytesIO()
    torch.save({"identity": json.dumps(identity, sort_keys=True),
                "format_version": _FORMAT_VERSION, "chosen": chosen, "rejected": rejected},
               buffer)
    def write() -> None:
        try:
            store.write_bytes_atomic(path, buffer.getvalue())
        except OSError as e:
            raise StoreError(f"caching the reference log-probs in {store.url(path)} failed: "
                             f"{e}. Nothing was trained yet; free space on (or make writable) "
                             f"the store and rerun") from None

    distributed.on_main(write)
    logger.info("computed reference log-probs of %d pairs in %.1f s", len(examples),
                time.perf_counter() - t0)
    return ReferenceLogprobs(chosen=chosen, rejected=rejected, path=store.url(path),
                             computed=True)


def create_starting_point_client(config: TrainConfig) -> TrainingClient:
    """A client holding the weights a run of ``config`` starts from, for forward passes only:
    a frozen copy of ``base_model`` (``create_reference_client``), or, when
    ``init_from_checkpoint`` is set, a client that loads that checkpoint's weights exactly as
    the policy does at its start (``TrainingCheckpoints.init_from``; no optimizer state).

    It has its own :class:`ServiceClient`, so dropping the client frees its weights.
    """
    infra = config.infra
    service = ServiceClient(infra.storage_root, device=infra.device,
                            mixed_precision=infra.mixed_precision, account=infra.account)
    if not config.init_from_checkpoint:
        return service.create_reference_client(config.base_model,
                                               tokenizer_model=config.tokenizer_model)
    # Not a frozen reference client: its load_state restores trainable tensors only, and a
    # frozen model has none, so the checkpoint would silently not be loaded.
    client = service.create_training_client(config.base_model,
                                            tokenizer_model=config.tokenizer_model)
    client.load_state(config.init_from_checkpoint).result()
    return client


def reference_identity(config: TrainConfig, dataset_fingerprint: str, **extra: Any,
                       ) -> dict[str, Any]:
    """What the reference log-probs of a run of ``config`` depend on (the cache identity):
    dataset contents, starting weights, tokenizer, ``max_seq_len``, device type and autocast
    dtype, plus ``extra`` (e.g. the long-row policy)."""
    device = resolve_device(config.infra.device)
    autocast = resolve_autocast_dtype(config.infra.mixed_precision, device)
    return {"dataset_fingerprint": dataset_fingerprint, "dataset_split": config.dataset_split,
            "base_model": config.base_model, "init_from_checkpoint": config.init_from_checkpoint,
            "tokenizer_model": tokenizer_name(config),
            "max_seq_len": config.max_seq_len, "device_type": device.type,
            "autocast_dtype": str(autocast).removeprefix("torch.") if autocast else "float32",
            **extra}


def compute_reference_logprobs(client: TrainingClient, examples: Sequence[PreferenceExample],
                               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of each pair's two sides under ``client`` (forward only).

    Returns:
        ``(chosen, rejected)``, each ``[len(examples)]`` float32 (nats).
    """
    chosen, rejected = [], []
    # Forward passes draw no random numbers today; forking keeps it that way for the policy's
    # RNG stream, which exact resume replays, whatever a future model does in forward.
    with torch.random.fork_rng(devices=[]):
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            datums = pair_datums(batch)
            output = client.forward(datums).result()
            logprobs = [out["logprobs"].to_torch().float() for out in output.loss_fn_outputs]
            logps, _ = sequence_logprobs(datums, logprobs)
            chosen.append(logps[:len(batch)])
            rejected.append(logps[len(batch):])
    return torch.cat(chosen), torch.cat(rejected)


def _decode(data: bytes, url: str, identity: dict[str, Any], num_pairs: int,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        payload = torch.load(io.BytesIO(data), weights_only=True)
        stored_identity = json.loads(payload["identity"])
        chosen, rejected = payload["chosen"], payload["rejected"]
    except Exception as e:  # any failure to parse means the same thing: a corrupt file
        raise StoreError(f"reference log-prob cache {url} is unreadable ({type(e).__name__}: "
                         f"{e}); delete it to recompute") from e
    if stored_identity != json.loads(json.dumps(identity, sort_keys=True)):
        raise StoreError(f"reference log-prob cache {url} was computed for {stored_identity}, "
                         f"not {identity} (a hash collision or a hand-copied file); delete it "
                         f"to recompute")
    if chosen.shape != (num_pairs,) or rejected.shape != (num_pairs,):
        raise StoreError(f"reference log-prob cache {url} holds {tuple(chosen.shape)} values, "
                         f"expected {num_pairs} pairs; delete it to recompute")
    return chosen, rejected
