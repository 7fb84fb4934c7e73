"""Inference deployments: an engine serving one base model, and hot-loading sampler snapshots.

A :class:`Deployment` is the local stand-in for a hosted inference deployment: an in-process
inference engine for a base model plus the identity of the sampler snapshot it currently serves.
A :class:`DeploymentManager` bound to a :class:`~training.sdk.store.CheckpointStore` creates,
finds, scales and deletes deployments, and *hot-loads* snapshots onto them:

* a **base** snapshot replaces the weights;
* a **delta** snapshot is applied onto the weights the deployment currently holds, and only if
  its manifest's reference *is* the deployment's ``current_snapshot_identity``.

A hotload is all-or-nothing: the new weights are reconstructed and verified (names, dtypes,
shapes, checksums) on the side, and copied into the engine only once they pass, so a refused or
corrupt snapshot leaves the deployment serving its previous weights. Tensors a delta leaves
unchanged are not copied again.

Engines: :class:`TransformersEngine` (default; batched ``generate`` with left padding and a KV
cache, any device) and :class:`VLLMEngine` (chosen by ``engine="auto"`` when vLLM is installed
and CUDA is available; the ``vllm`` extra).

Deployments live in the process that created them (there is no server process to reattach to);
``scripts/serve.py`` puts one behind an OpenAI-compatible HTTP API.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from training.sdk.engines import (  # the engines and errors, importable from here as before
    DeltaReferenceMismatchError,
    DeploymentError,
    DeploymentNotFoundError,
    DeploymentNotReadyError,
    Engine,
    HotloadError,
    HotloadTimeoutError,
    InferenceEngine,
    TokenCallback,
    TransformersEngine,
    VLLMEngine,
    vllm_available,
)
from training.sdk.hf_quiet import progress_bars_disabled
from training.sdk.models import load_causal_lm, load_tokenizer, model_source
from training.sdk.snapshots import (
    SnapshotError,
    apply_delta,
    load_base_weights,
    make_snapshot_identity,
    merge_lora_weights,
    parse_snapshot_identity,
    read_delta_manifest,
    sampler_weights,
)
from training.sdk.store import CheckpointStore, validate_name
from training.sdk.types import SampledSequence, SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "DeltaReferenceMismatchError", "Deployment", "DeploymentError", "DeploymentManager",
    "DeploymentNotFoundError", "DeploymentNotReadyError", "HotloadError", "HotloadTimeoutError",
    "InferenceEngine", "TransformersEngine", "VLLMEngine", "vllm_available",
]

DeploymentState = Literal["READY", "SCALED_TO_ZERO", "DELETED"]


# --------------------------------------------------------------------------------- deployment
@dataclass
class DeploymentStats:
    """Counters of what happened to a deployment (for monitoring and tests)."""

    hotloads: int = 0
    refused_hotloads: int = 0
    prompt_cache_resets: int = 0
    warmups: int = 0
    last_hotload_seconds: float | None = None
    """Wall time of the last successful hotload, in seconds."""


@dataclass
class Deployment:
    """One inference deployment. Create it with :meth:`DeploymentManager.create_deployment`."""

    deployment_id: str
    base_model: str
    tokenizer_model: str | None
    replica_count: int
    engine_kind: str
    state: DeploymentState = "READY"
    current_snapshot_identity: str | None = None
    """The sampler snapshot being served; None while the base model's own weights are served."""
    stats: DeploymentStats = field(default_factory=DeploymentStats)
    engine: InferenceEngine | None = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    _held: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _base_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def ready(self) -> bool:
        """True when the engine is up (not scaled to zero, not deleted)."""
        return self.state == "READY" and self.engine is not None

    def held_weights(self) -> dict[str, torch.Tensor] | None:
        """The served snapshot's weights exactly as stored (None before the first hotload)."""
        return self._held

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               num_samples: int = 1, on_token: TokenCallback | None = None,
               ) -> list[list[SampledSequence]]:
        """Sample completions for token prompts (one batch); see :meth:`InferenceEngine.generate`.

        Raises:
            DeploymentNotReadyError: the deployment was scaled to zero or deleted.
        """
        with self._lock:
            return self._engine().generate(prompts, params, num_samples, on_token)

    def prompt_logprobs(self, prompt: Sequence[int], topk: int = 0,
                        ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Logprobs of the prompt's own tokens under the served weights; see
        :meth:`InferenceEngine.prompt_logprobs`."""
        with self._lock:
            return self._engine().prompt_logprobs(prompt, topk)

    def routing_matrix(self, tokens: Sequence[int]) -> torch.Tensor:
        """Expert routing of ``tokens`` under the served weights; see
        :meth:`InferenceEngine.routing_matrix`."""
        with self._lock:
            return self._engine().routing_matrix(tokens)

    def _engine(self) -> InferenceEngine:
        if self.state == "DELETED":
            raise DeploymentNotReadyError(f"deployment {self.deployment_id!r} was deleted; "
                                          f"create a new one")
        if self.engine is None:
            raise DeploymentNotReadyError(
                f"deployment {self.deployment_id!r} is scaled to zero; scale it up with "
                f"DeploymentManager.scale({self.deployment_id!r}, 1)")
        return self.engine


class DeploymentManager:
    """Creates, finds, scales, deletes and hot-loads in-process deployments over one store.

    Args:
        store: the checkpoint store holding the snapshots to hot-load (or its URL / path).
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``...
        engine: ``"auto"`` (vLLM when :func:`vllm_available`, else transformers),
            ``"transformers"`` or ``"vllm"``.
        dtype: compute dtype of the transformers engine; ``"auto"`` is float32 on CPU (exact
            logprobs; the CPU gains little from bf16 at small batch) and bfloat16 on CUDA.
    """

    def __init__(self, store: CheckpointStore | str | None = None, *, device: str = "auto",
                 engine: Engine | str = "auto", dtype: str = "auto") -> None:
        self.store = store if isinstance(store, CheckpointStore) else CheckpointStore(store)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.engine = Engine.parse(engine, "engine")
        if dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, dtype)
        self._deployments: dict[str, Deployment] = {}
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def create_deployment(self, base_model: str, deployment_id: str | None = None, *,
                          tokenizer_model: str | None = None, replica_count: int = 1,
                          engine: str | None = None) -> Deployment:
        """Start a deployment serving ``base_model``'s own weights.

        ``replica_count`` is recorded; locally one engine serves every replica (0 creates it
        scaled to zero).

        Raises:
            DeploymentError: ``deployment_id`` already exists (use :meth:`create_or_get`).
        """
        deployment_id = validate_name(deployment_id or f"deploy-{secrets.token_hex(4)}",
                                      "deployment id")
        kind = self._engine_kind(engine or self.engine)
        with self._guard:
            if deployment_id in self._deployments and \
                    self._deployments[deployment_id].state != "DELETED":
                raise DeploymentError(f"deployment {deployment_id!r} already exists; use "
                                      f"create_or_get or get, or delete it first")
            deployment = Deployment(deployment_id=deployment_id, base_model=base_model,
                                    tokenizer_model=tokenizer_model, replica_count=replica_count,
                                    engine_kind=kind, state="SCALED_TO_ZERO")
            self._deployments[deployment_id] = deployment
        if replica_count > 0:
            self._start(deployment)
        return deployment

    def create_or_get(self, base_model: str, deployment_id: str, **kwargs: Any) -> Deployment:
        """The live deployment ``deployment_id`` (same base model), else a new one."""
        existing = self._deployments.get(deployment_id)
        if existing is not None and existing.state != "DELETED":
            if existing.base_model != base_model:
                raise DeploymentError(f"deployment {deployment_id!r} serves "
                                      f"{existing.base_model!r}, not {base_model!r}; use "
                                      f"another deployment id")
            return existing
        return self.create_deployment(base_model, deployment_id, **kwargs)

    def get(self, deployment_id: str) -> Deployment:
        """The deployment (in any state but deleted). Raises DeploymentNotFoundError."""
        deployment = self._deployments.get(deployment_id)
        if deployment is None or deployment.state == "DELETED":
            known = ", ".join(d.deployment_id for d in self.list_deployments()) or "none"
            raise DeploymentNotFoundError(f"no deployment {deployment_id!r} in this manager "
                                          f"(deployments: {known}); create it with "
                                          f"create_deployment")
        return deployment

    def list_deployments(self) -> list[Deployment]:
        return [d for d in self._deployments.values() if d.state != "DELETED"]

    def scale(self, deployment_id: str, replica_count: int) -> Deployment:
        """Set the replica count; 0 frees the engine, > 0 starts it again from the base model
        (the hot-loaded snapshot is gone after scale-to-zero: hot-load a base again)."""
        if replica_count < 0:
            raise ValueError(f"replica_count must be >= 0, got {replica_count}")
        deployment = self.get(deployment_id)
        with deployment._lock:
            deployment.replica_count = replica_count
            if replica_count == 0:
                self._stop(deployment, "SCALED_TO_ZERO")
            elif deployment.engine is None:
                self._start(deployment)
        return deployment

    def scale_to_zero(self, deployment_id: str) -> Deployment:
        return self.scale(deployment_id, 0)

    def delete(self, deployment_id: str) -> None:
        deployment = self.get(deployment_id)
        with deployment._lock:
            self._stop(deployment, "DELETED")

    def _engine_kind(self, engine: Engine | str) -> Engine:
        engine = Engine.parse(engine, "engine")
        if engine == Engine.auto:
            return Engine.vllm if vllm_available() else Engine.transformers
        if engine == Engine.vllm and not vllm_available():
            raise DeploymentError("engine='vllm' needs the 'vllm' package (pip install "
                                  "'homefire[vllm]') and a CUDA GPU; use engine='transformers'")
        return engine

    def _start(self, deployment: Deployment) -> None:
        with deployment._lock, progress_bars_disabled():
            tokenizer = load_tokenizer(deployment.tokenizer_model or deployment.base_model,
                                       self.store)
            if deployment.engine_kind == "vllm":
                with model_source(deployment.base_model, self.store) as source:
                    engine: InferenceEngine = VLLMEngine(source, tokenizer)
            else:
                model = load_causal_lm(deployment.base_model, self.store, dtype=self.dtype,
                                       device=self.device)
                engine = TransformersEngine(model, tokenizer)
            deployment.engine, deployment.tokenizer = engine, tokenizer
            deployment.state, deployment.current_snapshot_identity = "READY", None
            deployment._held = None
        logger.info("deployment %s: %s on %s (%s)", deployment.deployment_id,
                    deployment.base_model, self.device, deployment.engine_kind)

    @staticmethod
    def _stop(deployment: Deployment, state: DeploymentState) -> None:
        if deployment.engine is not None:
            deployment.engine.close()
        deployment.engine, deployment._held = None, None
        deployment.current_snapshot_identity = None
        deployment.state = state

    # ------------------------------------------------------------------ weight sync
    def current_snapshot_identity(self, deployment_id: str) -> str | None:
        """The snapshot the deployment serves (None: the base model's own weights)."""
        return self.get(deployment_id).current_snapshot_identity

    def is_hotload_ready(self, deployment_id: str) -> bool:
        """Whether the deployment can take a hotload now (its engine is up)."""
        return self.get(deployment_id).ready

    def wait_for_hotload_ready(self, deployment_id: str, timeout_s: float = 300,
                               poll_interval_s: float = 5) -> None:
        """Block until :meth:`is_hotload_ready`; raises HotloadTimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.is_hotload_ready(deployment_id):
            if time.monotonic() >= deadline:
                raise HotloadTimeoutError(f"deployment {deployment_id!r} was not ready for a "
                                          f"hotload within {timeout_s} s (state "
                                          f"{self.get(deployment_id).state}); scale it up")
            time.sleep(poll_interval_s)

    def hotload(self, deployment_id: str, snapshot_identity: str, *,
                base_model: str | None = None, default_job_id: str | None = None,
                timeout_s: float | None = None, reset_prompt_cache: bool = True,
                warmup: bool = False, warmup_max_retries: int = 10) -> str:
        """Load one sampler snapshot onto the deployment; returns its identity.

        A base replaces the weights; a delta is applied onto the held weights and must
        reference ``current_snapshot_identity``. Nothing changes unless the whole snapshot
        verifies. ``timeout_s`` bounds the wait for in-flight requests to finish.

        Raises:
            DeltaReferenceMismatchError: a delta built on other weights than those held.
            HotloadError: another base model, a corrupt snapshot, or incompatible weights.
            HotloadTimeoutError: requests kept the deployment busy past ``timeout_s``.
            CheckpointNotFoundError: no such (unexpired) snapshot.
        """
        deployment = self.get(deployment_id)
        job_id, name = parse_snapshot_identity(snapshot_identity, default_job_id)
        identity = make_snapshot_identity(job_id, name)
        if base_model is not None and base_model != deployment.base_model:
            raise HotloadError(f"deployment {deployment_id!r} serves {deployment.base_model!r}, "
                               f"not {base_model!r}; hotload onto a deployment of that model")
        meta = self.store.get_sampler(job_id, name)
        if not deployment._lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            raise HotloadTimeoutError(f"deployment {deployment_id!r} stayed busy for "
                                      f"{timeout_s} s; {identity} was not loaded")
        try:
            started = time.perf_counter()
            engine = deployment._engine()
            try:
                weights = self._reconstruct(deployment, identity, meta)
                _check_shapes(weights, engine.weight_shapes(), deployment_id, identity)
            except HotloadError:
                deployment.stats.refused_hotloads += 1
                raise
            # A delta's unchanged tensors are the held tensor objects: the engine has them.
            previous = deployment._held or {}
            engine.load_weights({k: v for k, v in weights.items() if previous.get(k) is not v})
            deployment._held = weights
            deployment.current_snapshot_identity = identity
            deployment.stats.hotloads += 1
            deployment.stats.last_hotload_seconds = time.perf_counter() - started
            if reset_prompt_cache:
                engine.reset_prompt_cache()
                deployment.stats.prompt_cache_resets += 1
        finally:
            deployment._lock.release()
        logger.info("deployment %s now serves %s (%s, %.3f s)", deployment_id, identity,
                    meta.snapshot_type, deployment.stats.last_hotload_seconds)
        if warmup:
            self.warmup(deployment_id, max_retries=warmup_max_retries)
        return identity

    def hotload_and_wait(self, deployment_id: str, base_model: str, snapshot_identity: str,
                         timeout_seconds: float = 600, **kwargs: Any) -> str:
        """:meth:`hotload` with the hosted API's argument order; returns when it is served."""
        return self.hotload(deployment_id, snapshot_identity, base_model=base_model,
                            timeout_s=timeout_seconds, **kwargs)

    def sync(self, deployment_id: str, snapshot_identity: str, *,
             default_job_id: str | None = None, **kwargs: Any) -> list[str]:
        """Bring the deployment to ``snapshot_identity`` by whatever chain it takes.

        Walks back the delta chain from the target until it reaches the snapshot the
        deployment holds or a base, then hot-loads forward. Returns the identities loaded
        (empty if it already serves the target).
        """
        deployment = self.get(deployment_id)
        job_id, name = parse_snapshot_identity(snapshot_identity, default_job_id)
        current = make_snapshot_identity(job_id, name)
        chain: list[str] = []
        while current != deployment.current_snapshot_identity:
            chain.append(current)
            job_id, name = parse_snapshot_identity(current)
            if self.store.get_sampler(job_id, name).snapshot_type != "INFERENCE_ARC_V2":
                break
            with self.store.local_copy(self.store.sampler_dir(job_id, name)) as local:
                current = read_delta_manifest(local).reference
            if current in chain:
                raise HotloadError(f"snapshot {snapshot_identity}: its delta chain loops")
        for identity in reversed(chain):
            self.hotload(deployment_id, identity, **kwargs)
        return list(reversed(chain))

    def _pristine_base(self, deployment: Deployment) -> dict[str, torch.Tensor]:
        """The base model's own weights (loaded once per deployment, for LoRA merges)."""
        if deployment._base_weights is None:
            from training.sdk.models import load_causal_lm

            deployment._base_weights = sampler_weights(
                load_causal_lm(deployment.base_model, self.store), torch.float32)
        return deployment._base_weights

    def _reconstruct(self, deployment: Deployment, identity: str,
                     meta: Any) -> dict[str, torch.Tensor]:
        if meta.base_model != deployment.base_model:
            raise HotloadError(f"snapshot {identity} was trained from {meta.base_model!r}, but "
                               f"deployment {deployment.deployment_id!r} serves "
                               f"{deployment.base_model!r}; hotload it onto a deployment of "
                               f"that base model")
        job_id, name = parse_snapshot_identity(identity)
        entry_dir = self.store.sampler_dir(job_id, name)
        try:
            if meta.snapshot_type == "INFERENCE_BASE":
                return load_base_weights(self.store, entry_dir, identity)
            if meta.snapshot_type == "INFERENCE_LORA":
                # An adapter always applies to the pristine base, whatever is held now.
                with self.store.local_copy(entry_dir) as local:
                    return merge_lora_weights(self._pristine_base(deployment), local, identity)
            if meta.snapshot_type != "INFERENCE_ARC_V2":
                raise HotloadError(f"snapshot {identity} is {meta.snapshot_type}; deployments "
                                   f"hot-load INFERENCE_BASE, INFERENCE_LORA and "
                                   f"INFERENCE_ARC_V2 snapshots")
            with self.store.local_copy(entry_dir) as local:
                manifest = read_delta_manifest(local)
                reference = manifest.reference
                held = deployment.current_snapshot_identity
                if reference != held or deployment._held is None:
                    raise DeltaReferenceMismatchError(
                        f"delta {identity} applies to {reference}, but deployment "
                        f"{deployment.deployment_id!r} holds "
                        f"{held or 'the base model weights'}; it keeps serving those. "
                        f"Hotload {reference} (or any base snapshot) first, or use "
                        f"DeploymentManager.sync to load the whole chain")
                return apply_delta(deployment._held, local, reference_identity=reference,
                                   manifest=manifest)
        except SnapshotError as e:
            raise HotloadError(f"hotload of {identity} onto deployment "
                               f"{deployment.deployment_id!r} refused, it keeps serving "
                               f"{deployment.current_snapshot_identity or 'the base model'}: "
                               f"{e}") from e

    # ------------------------------------------------------------------ warmup / cache
    def warmup(self, deployment_id: str, max_retries: int = 10) -> None:
        """Send one short request, retrying up to ``max_retries`` times on engine errors."""
        deployment = self.get(deployment_id)
        token = deployment.tokenizer.eos_token_id or 0
        for attempt in range(max_retries + 1):
            try:
                deployment.sample([[token]], SamplingParams(max_tokens=1, temperature=0))
                deployment.stats.warmups += 1
                return
            except (RuntimeError, DeploymentNotReadyError):
                if attempt == max_retries:
                    raise
                logger.warning("warmup of %s failed (attempt %d), retrying", deployment_id,
                               attempt + 1, exc_info=True)
                time.sleep(min(2 ** attempt * 0.1, 5))

    def reset_prompt_cache(self, deployment_id: str) -> None:
        deployment = self.get(deployment_id)
        with deployment._lock:
            deployment._engine().reset_prompt_cache()
            deployment.stats.prompt_cache_resets += 1


def _check_shapes(weights: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                  deployment_id: str, identity: str) -> None:
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:5]
        extra = sorted(set(weights) - set(expected))[:5]
        raise HotloadError(f"snapshot {identity} does not fit deployment {deployment_id!r}'s "
                           f"model (missing {missing}, unknown {extra}); it keeps serving its "
                           f"previous weights")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise HotloadError(f"snapshot {identity}: tensor {name!r} has shape "
                               f"{tuple(tensor.shape)}, deployment {deployment_id!r}'s model "
                               f"has {tuple(expected[name])}; it keeps serving its previous "
                               f"weights")

