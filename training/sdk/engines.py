"""The inference engines a deployment runs (in-process ``transformers`` generation, or vLLM
on a CUDA GPU), and the errors deployments report."""

from __future__ import annotations

import abc
import importlib.util
import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from training.sdk.choices import Choice
from training.sdk.models import load_causal_lm, load_tokenizer
from training.sdk.routing import capture_routing, moe_routers
from training.sdk.store import CheckpointStore
from training.sdk.types import SampledSequence, SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "DeltaReferenceMismatchError", "DeploymentError", "DeploymentNotFoundError",
    "DeploymentNotReadyError", "Engine", "HotloadError", "HotloadTimeoutError",
    "InferenceEngine", "TokenCallback", "TransformersEngine", "VLLMEngine", "vllm_available",
]

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



class Engine(Choice):
    """The inference engine of a deployment."""

    auto = "auto"
    """vLLM when :func:`vllm_available`, else transformers."""
    transformers = "transformers"
    """In-process ``transformers`` generation (any device)."""
    vllm = "vllm"
    """vLLM in this process (needs the ``vllm`` package and a CUDA GPU)."""


