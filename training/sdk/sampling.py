"""Sampling clients over a deployment: Tinker's ``SamplingClient`` and the native sampler.

Both look their deployment up by id at every call, so a hotload (or a scale-to-zero) between
calls is seen by the next one.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from training.sdk.deployments import Deployment, DeploymentManager
from training.sdk.futures import APIFuture, AwaitableSelf, async_twins, completed
from training.sdk.types import SampleResponse, SamplingParams, as_model_input, as_sampling_params

__all__ = ["DeploymentSampler", "SampledCompletion", "SamplingClient"]


@async_twins("sample", "compute_logprobs", "get_base_model")
class SamplingClient(AwaitableSelf):
    """Tinker-shaped sampler: ``sample(prompt, num_samples, sampling_params)`` on a deployment.

    Create it with :meth:`training.sdk.ServiceClient.create_sampling_client` or
    :meth:`training.sdk.TrainingClient.save_weights_and_get_sampling_client`. As in ``tinker``,
    the client is also a future of itself (``.result()``, ``await``), and every method has an
    ``*_async`` twin.
    """

    def __init__(self, deploy_mgr: DeploymentManager, deployment_id: str,
                 model_path: str | None = None) -> None:
        self.deploy_mgr = deploy_mgr
        self.deployment_id = deployment_id
        self.model_path = model_path
        """The snapshot synced when this client was created (None: whatever is served)."""

    @property
    def deployment(self) -> Deployment:
        return self.deploy_mgr.get(self.deployment_id)

    def get_tokenizer(self) -> Any:
        return self.deployment.tokenizer

    def get_base_model(self) -> str:
        """The base model the deployment serves (its weights may be a later snapshot)."""
        return self.deployment.base_model

    def sample(self, prompt: Any, num_samples: int = 1, sampling_params: Any = None,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
               topk_sample_logprobs: int = 0) -> APIFuture[SampleResponse]:
        """``num_samples`` completions of ``prompt`` in one batch; returns a completed future.

        ``prompt`` is a ``ModelInput`` (this package's or ``tinker``'s) and ``sampling_params``
        a ``SamplingParams`` (either, or a dict; default: ours). Each sequence has its tokens
        (the stop token included), per-token logprobs and its ``stop_reason``.
        ``include_prompt_logprobs`` / ``topk_prompt_logprobs=k`` also score the prompt's own
        tokens (and the k most likely tokens at each prompt position), and
        ``topk_sample_logprobs=k`` the k most likely tokens at each sampled position, under the
        same weights (one more forward pass per sequence).
        """
        tokens = as_model_input(prompt).to_ints()
        params = as_sampling_params(sampling_params or SamplingParams())
        deployment = self.deployment
        # One hold of the (re-entrant) deployment lock: no hotload between the passes.
        with deployment._lock:
            sequences = deployment.sample([tokens], params, num_samples)[0]
            response = SampleResponse(sequences=sequences)
            if include_prompt_logprobs or topk_prompt_logprobs:
                chosen, top = deployment.prompt_logprobs(tokens, topk_prompt_logprobs)
                response.prompt_logprobs = chosen if include_prompt_logprobs else None
                response.topk_prompt_logprobs = top if topk_prompt_logprobs else None
            if topk_sample_logprobs > 0:
                for seq in sequences:
                    _, top = deployment.prompt_logprobs([*tokens, *seq.tokens],
                                                        topk_sample_logprobs)
                    seq.topk_logprobs = top[len(tokens):]
        return completed(response)

    def compute_logprobs(self, prompt: Any) -> APIFuture[list[float | None]]:
        """``log p(prompt_i | prompt_<i)`` of each prompt token under the served weights
        (``None`` for the first token, which nothing predicts)."""
        chosen, _ = self.deployment.prompt_logprobs(as_model_input(prompt).to_ints())
        return completed(chosen)


@dataclass
class SampledCompletion:
    """One completion from :meth:`DeploymentSampler.sample_with_tokens`."""

    text: str
    """The completion decoded without special tokens."""
    tokens: list[int]
    """Completion token ids (the stop token included)."""
    logprobs: list[float]
    """Per-token ``log p(token | prompt, previous tokens)`` (temperature 1), one per token."""
    finish_reason: str
    """``stop`` (stop token or string) or ``length`` (``max_tokens`` reached)."""
    prompt_tokens: list[int] = field(default_factory=list)
    """The rendered prompt's token ids."""
    routing_matrix: Any = None
    """With ``include_routing_matrix=True`` (MoE models): int64 ``[prompt + completion tokens,
    moe_layers, top_k]``, the experts each token went to under the served weights. Pass
    ``routing_matrix[:-1]`` as ``loss_fn_inputs["routing_matrices"]`` of the datum whose
    ``model_input`` is ``full_tokens[:-1]`` to replay it in training."""

    @property
    def full_tokens(self) -> list[int]:
        """Prompt then completion: what a training datum is built from."""
        return [*self.prompt_tokens, *self.tokens]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_tokens)

    @property
    def inference_logprobs(self) -> list[float]:
        """The hosted SDK's name for :attr:`logprobs`."""
        return self.logprobs


class DeploymentSampler:
    """Chat-level sampler returning tokens, text, logprobs and finish reasons.

    Args:
        deploy_mgr, deployment_id: the deployment to sample from.
        tokenizer: renders messages (its chat template) and decodes completions; default: the
            deployment's.
        concurrency_controller: accepted for source compatibility; the local engine batches
            the ``n`` samples of a call itself, so there is nothing to throttle.
    """

    def __init__(self, deploy_mgr: DeploymentManager, deployment_id: str,
                 tokenizer: Any = None, concurrency_controller: Any = None) -> None:
        if concurrency_controller is not None:
            warnings.warn("DeploymentSampler(concurrency_controller=...) has no effect on a "
                          "local deployment (each call is one batch)", UserWarning, stacklevel=2)
        self.deploy_mgr = deploy_mgr
        self.deployment_id = deployment_id
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer or self.deploy_mgr.get(self.deployment_id).tokenizer

    def render(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` with the chat template and the assistant turn opened."""
        return list(self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False))

    def sample_with_tokens_sync(self, messages: Sequence[dict[str, Any]], n: int = 1, *,
                                max_tokens: int = 64, temperature: float = 1.0,
                                top_p: float = 1.0, top_k: int = -1, seed: int | None = None,
                                stop: str | list[str] | list[int] | None = None,
                                include_routing_matrix: bool = False,
                                ) -> list[SampledCompletion]:
        """``n`` completions of the chat ``messages`` (one batch); with
        ``include_routing_matrix`` each carries its MoE expert routing (one more forward pass
        per completion, under the same weights: no hotload in between)."""
        prompt = self.render(messages)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop)
        deployment = self.deploy_mgr.get(self.deployment_id)
        with deployment._lock:  # re-entrant: sampling and routing see the same weights
            sequences = deployment.sample([prompt], params, n)[0]
            routing = [deployment.routing_matrix([*prompt, *s.tokens]) if include_routing_matrix
                       else None for s in sequences]
        tokenizer = self.tokenizer
        return [SampledCompletion(text=tokenizer.decode(s.tokens, skip_special_tokens=True),
                                  tokens=s.tokens, logprobs=s.logprobs or [],
                                  finish_reason=s.stop_reason, prompt_tokens=prompt,
                                  routing_matrix=r)
                for s, r in zip(sequences, routing, strict=True)]

    async def sample_with_tokens(self, messages: Sequence[dict[str, Any]], n: int = 1,
                                 **kwargs: Any) -> list[SampledCompletion]:
        """Async :meth:`sample_with_tokens_sync` (runs in a worker thread)."""
        return await asyncio.to_thread(self.sample_with_tokens_sync, messages, n, **kwargs)
