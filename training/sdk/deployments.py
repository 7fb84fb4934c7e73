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

import abc
import importlib.util
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from training.sdk.choices import Choice
from training.sdk.hf_quiet import progress_bars_disabled
from training.sdk.models import load_causal_lm, load_tokenizer, model_source
from training.sdk.routing import capture_routing, moe_routers
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
TokenCallback = Callable[[list[int]], None]
"""Called once per decoding step with the new token of every row of the batch (rows in
prompt-major order; a row that has finished gets the pad token)."""


class DeploymentError(Exception):
    """Base class of deployment errors."""


class DeploymentNotFoundError(DeploymentError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DeploymentNotReadyError(DeploymentError):
    """The deployment was deleted (or its engine failed to start)."""


class HotloadError(DeploymentError):
    """A snapshot was not loaded; the deployment keeps serving its previous weights."""


class DeltaReferenceMismatchError(HotloadError):
    """A delta's reference snapshot is not the one the deployment holds."""


class HotloadTimeoutError(HotloadError, TimeoutError):
    """The deployment stayed busy (serving requests) past the hotload timeout."""


def vllm_available() -> bool:
    """Whether the vLLM engine can run here: ``vllm`` importable and a CUDA GPU present."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


# --------------------------------------------------------------------------------- engines
class InferenceEngine(abc.ABC):
    """What a deployment needs from an inference engine."""

    name = "abstract"

    @abc.abstractmethod
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every weight a snapshot must provide (tied weights once)."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 num_samples: int = 1, on_token: TokenCallback | None = None,
                 ) -> list[list[SampledSequence]]:
        """``num_samples`` completions of each prompt (token ids), in one batch."""

    @abc.abstractmethod
    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Replace the served weights named in ``weights`` (checked against
        :meth:`weight_shapes`; a subset when a delta left the others unchanged)."""

    def prompt_logprobs(self, prompt: Sequence[int], topk: int = 0,
                        ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """``log p(prompt_i | prompt_<i)`` per token (None first) and the ``topk`` most likely
        ``(token, logprob)`` per position (empty lists when ``topk`` is 0)."""
        raise DeploymentError(f"the {self.name} engine does not serve prompt logprobs; use "
                              f"TrainingClient.forward for logprobs of given tokens")

    def routing_matrix(self, tokens: Sequence[int]) -> torch.Tensor:
        """``[tokens, moe_layers, top_k]`` experts each token is routed to under the served
        weights (MoE models; see :mod:`training.sdk.routing`)."""
        raise DeploymentError(f"the {self.name} engine does not report expert routing")

    def reset_prompt_cache(self) -> None:  # noqa: B027 (optional hook; default: no cache)
        """Forget cached prompt KV state (stale once the weights change)."""

    def close(self) -> None:  # noqa: B027 (optional hook; default: nothing to release)
        """Release the engine's memory."""


class _StepStreamer(BaseStreamer):
    """Feeds each decoding step's tokens to a callback (the first ``put`` is the prompt)."""

    def __init__(self, callback: TokenCallback) -> None:
        self.callback = callback
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.callback(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class TransformersEngine(InferenceEngine):
    """In-process engine on ``transformers``: batched ``generate`` with left padding and KV cache.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        compute_dtype: dtype the model runs in; snapshot weights are cast to it on load (fp32
            upcasts of bf16 snapshots are exact).

    It keeps no KV state between requests, so :meth:`reset_prompt_cache` only counts calls.
    """

    name = "transformers"

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.prompt_cache_resets = 0
        # state_dict tensors share storage with the parameters: copying into them loads weights.
        self._state = self.model.state_dict()
        # Same de-duplication of tied tensors as snapshots.sampler_weights.
        self._shapes = {k: tuple(v.shape) for k, v in _untied_state(self.model).items()}

    @classmethod
    def from_pretrained(cls, base_model: str, store: CheckpointStore | None = None, *,
                        tokenizer_model: str | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> TransformersEngine:
        tokenizer = load_tokenizer(tokenizer_model or base_model, store)
        model = load_causal_lm(base_model, store, dtype=dtype, device=device)
        return cls(model, tokenizer)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in weights.items():
                # copy_ casts and moves in one pass (no temporary of the engine's dtype).
                self._state[name].copy_(tensor)

    def reset_prompt_cache(self) -> None:
        self.prompt_cache_resets += 1

    @torch.no_grad()
    def prompt_logprobs(self, prompt: Sequence[int], topk: int = 0,
                        ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        if len(prompt) == 0:
            raise ValueError("the prompt needs at least one token")
        ids = torch.tensor([list(map(int, prompt))], device=self.device)
        logprobs = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), -1)
        chosen = logprobs.gather(-1, ids[0, 1:, None])[:, 0].tolist()
        top: list[list[tuple[int, float]] | None] = [None]
        if topk > 0:
            values, indices = logprobs.topk(min(topk, logprobs.shape[-1]), dim=-1)
            top += [list(zip(i.tolist(), v.tolist(), strict=True))
                    for i, v in zip(indices, values, strict=True)]
        return [None, *chosen], top if topk > 0 else []

    @torch.no_grad()
    def routing_matrix(self, tokens: Sequence[int]) -> torch.Tensor:
        if not moe_routers(self.model):
            raise DeploymentError("the served model has no mixture-of-experts layers: it has "
                                  "no routing matrix")
        ids = torch.tensor([list(map(int, tokens))], device=self.device)
        with capture_routing(self.model) as captured:
            self.model(input_ids=ids, use_cache=False)
        return torch.stack(captured, dim=1)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 num_samples: int = 1, on_token: TokenCallback | None = None,
                 ) -> list[list[SampledSequence]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        rows = [list(map(int, p)) for p in prompts for _ in range(num_samples)]
        width = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's next token is at the end
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
        stop_ids = sorted({*params.stop_token_ids(), self.tokenizer.eos_token_id} - {None})
        stop_strings = params.stop_strings()
        greedy = params.temperature == 0
        config = GenerationConfig(
            max_new_tokens=params.max_tokens, do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy or params.top_k <= 0 else params.top_k,
            pad_token_id=pad_id, eos_token_id=stop_ids, stop_strings=stop_strings or None,
            output_logits=True, return_dict_in_generate=True, use_cache=True)
        extra = {"tokenizer": self.tokenizer} if stop_strings else {}
        streamer = _StepStreamer(on_token) if on_token is not None else None
        with _seeded(params.seed, self.device):
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=attention_mask.to(self.device),
                                      generation_config=config, streamer=streamer, **extra)
        new_tokens = out.sequences[:, width:].cpu()
        # Raw logits (before temperature / top-k / top-p): logprobs equal a forward pass's.
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1).cpu()
        chosen = logprobs.gather(-1, new_tokens[..., None])[..., 0]
        results = []
        for i in range(len(rows)):
            tokens = new_tokens[i].tolist()
            end, reason = _cut(tokens, stop_ids, stop_strings, self.tokenizer)
            results.append(SampledSequence(stop_reason=reason, tokens=tokens[:end],
                                           logprobs=chosen[i, :end].tolist()))
        return [results[j * num_samples:(j + 1) * num_samples] for j in range(len(prompts))]

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._state = {}


def _untied_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a snapshot of ``model`` holds (tied ones once), without copying them."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    found = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            found[name] = tensor
    return found


def _cut(tokens: list[int], stop_ids: list[int], stop_strings: list[str],
         tokenizer: Any) -> tuple[int, Literal["stop", "length"]]:
    """Length to keep (stop token included) and why the completion ended."""
    end = len(tokens)
    reason: Literal["stop", "length"] = "length"
    for i, token in enumerate(tokens):
        if token in stop_ids:
            end, reason = i + 1, "stop"
            break
    if stop_strings:
        for i in range(end):
            text = tokenizer.decode(tokens[:i + 1])
            if any(s in text for s in stop_strings):
                return i + 1, "stop"
    return end, reason


class _seeded:
    """Run a block with the torch RNG seeded (and restored after), or untouched if no seed."""

    def __init__(self, seed: int | None, device: torch.device) -> None:
        self.seed = seed
        self.devices = [device] if device.type == "cuda" else []
        self._fork: Any = None

    def __enter__(self) -> None:
        if self.seed is None:
            return
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        if self._fork is not None:
            self._fork.__exit__(*exc)


class VLLMEngine(InferenceEngine):
    """vLLM on a CUDA GPU (the ``vllm`` extra). Weights are pushed in process.

    Args:
        model_dir: a Hugging Face directory of the base model.
        tokenizer: its tokenizer.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (0-1).
    """

    name = "vllm"

    def __init__(self, model_dir: str, tokenizer: Any, *, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.5) -> None:
        if not vllm_available():
            raise DeploymentNotReadyError("the vLLM engine needs the 'vllm' package and a CUDA "
                                          "GPU; use engine='transformers' here")
        # Weight pushes call into the model directly, which needs the engine in this process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from safetensors import safe_open
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True,
                       gpu_memory_utilization=gpu_memory_utilization)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
            with safe_open(os.path.join(model_dir, file), "pt") as f:
                for key in f.keys():
                    self._shapes[key] = tuple(f.get_slice(key).get_shape())

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        items = list(weights.items())
        self.llm.apply_model(lambda model: model.load_weights(iter(items)))

    def reset_prompt_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 num_samples: int = 1, on_token: TokenCallback | None = None,
                 ) -> list[list[SampledSequence]]:
        from vllm import SamplingParams as VLLMSamplingParams

        vllm_params = VLLMSamplingParams(
            n=num_samples, max_tokens=params.max_tokens, temperature=params.temperature,
            top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1,
            seed=params.seed, stop=params.stop_strings() or None,
            stop_token_ids=params.stop_token_ids() or None, logprobs=0)
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        if on_token is not None:
            rows = self._generate_streaming(requests, vllm_params, num_samples, on_token)
        else:
            rows = [(list(c.token_ids), list(c.logprobs or []), c.finish_reason)
                    for output in self.llm.generate(requests, vllm_params, use_tqdm=False)
                    for c in sorted(output.outputs, key=lambda c: c.index)]
        sequences = []
        for tokens, steps, finish_reason in rows:
            logprobs = [step[token].logprob for step, token in zip(steps, tokens, strict=True)]
            sequences.append(SampledSequence(
                stop_reason="length" if finish_reason == "length" else "stop",
                tokens=tokens, logprobs=logprobs))
        return [sequences[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]

    def _generate_streaming(self, requests: list[dict[str, Any]], vllm_params: Any,
                            num_samples: int, on_token: TokenCallback,
                            ) -> list[tuple[list[int], list[Any], str | None]]:
        """``LLM.generate``'s engine loop, stepped by hand so each step's new tokens reach
        ``on_token``. Rows are prompt-major, like the transformers engine's; a row with no new
        token in a step (finished, or not scheduled yet) gets the pad token. Returns each row's
        tokens, per-token logprob dicts and finish reason."""
        from vllm.sampling_params import RequestOutputKind

        # DELTA outputs: each step hands over only what is new, also for n > 1, where vLLM
        # reports every sample on its own (a cumulative output would not hold all n at the end).
        vllm_params.output_kind = RequestOutputKind.DELTA
        engine = self.llm.llm_engine
        ids = [f"homefire-{secrets.token_hex(6)}-{i}" for i in range(len(requests))]
        first_row = {request_id: i * num_samples for i, request_id in enumerate(ids)}
        rows: list[tuple[list[int], list[Any], list[str | None]]] = [
            ([], [], [None]) for _ in range(len(requests) * num_samples)]
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        unfinished = set(ids)
        for request_id, request in zip(ids, requests, strict=True):
            engine.add_request(request_id, request, vllm_params)
        try:
            while engine.has_unfinished_requests():
                fresh: dict[int, list[int]] = {}
                for output in engine.step():
                    for completion in output.outputs:
                        r = first_row[output.request_id] + completion.index
                        tokens, logprobs, reason = rows[r]
                        tokens.extend(completion.token_ids)
                        logprobs.extend(completion.logprobs or [])
                        reason[0] = completion.finish_reason or reason[0]
                        fresh.setdefault(r, []).extend(completion.token_ids)
                    if output.finished:
                        unfinished.discard(output.request_id)
                for k in range(max((len(t) for t in fresh.values()), default=0)):
                    on_token([fresh[r][k] if k < len(fresh.get(r, ())) else pad
                              for r in range(len(rows))])
        finally:
            if unfinished:  # an error or an interrupt: free the engine for the next request
                engine.abort_request(sorted(unfinished))
        return [(tokens, logprobs, reason[0]) for tokens, logprobs, reason in rows]

    def close(self) -> None:
        del self.llm


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


class Engine(Choice):
    """The inference engine of a deployment."""

    auto = "auto"
    """vLLM when :func:`vllm_available`, else transformers."""
    transformers = "transformers"
    """In-process ``transformers`` generation (any device)."""
    vllm = "vllm"
    """vLLM in this process (needs the ``vllm`` package and a CUDA GPU)."""


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

