"""homefire's clients against a trainer server in another process (``scripts/trainer_server.py``).

``ServiceClient(base_url="http://127.0.0.1:8000")`` (the seeds' "connect to an existing trainer
by URL") and ``ServiceClient.from_config(base_model, base_url=..., trainer_job_id=...)`` return a
:class:`RemoteServiceClient`. Its training clients have the in-process names (``forward``,
``forward_backward``, ``forward_backward_custom``, ``optim_step``, ``save_state``,
``load_state[_with_optimizer]``, ``save_weights_for_sampler``, ...) and take this package's or
``tinker``'s ``Datum``, ``AdamParams`` and ``SamplingParams``; they run on the server through
the official ``tinker`` client, so their futures and results are ``tinker``'s (the same field
names: ``loss_fn_outputs``, ``metrics``, ``path``, ``sequences``).

What the server adds for these clients (``POST /api/v1/homefire/create_trainer``, see
docs/server.md): full-parameter trainers (``lora_rank=0``), LoRA alpha/dropout/targets,
frozen references, and reattaching a trainer job by id from another process: a job whose model
the server holds is shared live (weights and optimizer, as reconnecting to a running hosted
trainer), one it does not hold (the server restarted) is loaded from its base, to be restored
from its last ``save_state``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from training.sdk.types import as_adam_params, as_datum, as_model_input

logger = logging.getLogger(__name__)

__all__ = ["HOSTED_CONTROL_PLANE", "RemoteServiceClient", "RemoteTrainingClient",
           "is_trainer_server_url"]

HOSTED_CONTROL_PLANE = "https://api.fireworks.ai"
"""The hosted SDK's default ``base_url``: a ported script that still names it trains locally."""

_DEFAULT_API_KEY = "tml-homefire"
"""The key sent to a server started without ``--api-key`` (the ``tinker`` client needs one)."""


def is_trainer_server_url(base_url: str | None) -> bool:
    """Whether ``base_url`` names a homefire trainer server (anything but the hosted control
    plane, which ported scripts still pass and which means "train in this process")."""
    return bool(base_url) and base_url.rstrip("/") != HOSTED_CONTROL_PLANE


def _tinker_datum(value: Any) -> Any:
    from tinker import types as tinker_types

    if isinstance(value, tinker_types.Datum):
        return value
    datum = as_datum(value)
    return tinker_types.Datum(
        model_input=tinker_types.ModelInput.from_ints(datum.model_input.to_ints()),
        loss_fn_inputs={k: tinker_types.TensorData(data=v.data, dtype=v.dtype, shape=v.shape)
                        for k, v in datum.loss_fn_inputs.items()})


def _tinker_data(data: Sequence[Any]) -> list[Any]:
    return [_tinker_datum(d) for d in data]


def _tinker_model_input(value: Any) -> Any:
    from tinker import types as tinker_types

    if isinstance(value, tinker_types.ModelInput):
        return value
    return tinker_types.ModelInput.from_ints(as_model_input(value).to_ints())


def _tinker_sampling_params(value: Any) -> Any:
    from tinker import types as tinker_types

    if value is None or isinstance(value, tinker_types.SamplingParams):
        return value or tinker_types.SamplingParams()
    fields = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    return tinker_types.SamplingParams(**{f: getattr(value, f) for f in fields
                                          if getattr(value, f, None) is not None})


class RemoteServiceClient:
    """A :class:`~training.sdk.ServiceClient` whose trainers live on a trainer server.

    Args:
        base_url: the server's URL (``http://127.0.0.1:8000``).
        api_key: the server's ``--api-key`` (default ``$TINKER_API_KEY``; any value for a
            server started without one).
        config: what :meth:`ServiceClient.from_config` set (base model, LoRA rank,
            ``trainer_job_id`` and ``reference_trainer_job_id`` to reattach).
    """

    def __init__(self, base_url: str, api_key: str | None = None, *,
                 config: Any = None) -> None:
        import tinker

        from training.sdk.service_client import ManagedConfig

        self.base_url = base_url.rstrip("/")
        self.config = config if config is not None else ManagedConfig()
        self._tinker = tinker.ServiceClient(
            base_url=self.base_url,
            api_key=api_key or os.environ.get("TINKER_API_KEY") or _DEFAULT_API_KEY)
        self._clients: dict[tuple, RemoteTrainingClient] = {}

    # ---------------------------------------------------------------- trainers
    def create_training_client(self, base_model: str, lora_rank: int = 0,
                               user_metadata: dict[str, str] | None = None, *,
                               tokenizer_model: str | None = None, job_id: str | None = None,
                               lora_alpha: float | None = None, lora_dropout: float = 0.0,
                               lora_target_modules: list[str] | None = None,
                               ) -> RemoteTrainingClient:
        """A trainer on the server (or, with ``job_id`` / the config's ``trainer_job_id``, a
        reattach to that job). Same arguments and errors as the in-process one."""
        from training.sdk.service_client import check_new_trainer

        del tokenizer_model  # the server's tokenizer is the base model's
        key = check_new_trainer(self._clients, base_model, lora_rank)
        client = self._create(base_model, lora_rank=lora_rank, user_metadata=user_metadata,
                              job_id=job_id or self.config.trainer_job_id,
                              lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                              lora_target_modules=lora_target_modules)
        self._clients[key] = client
        return client

    def create_reference_client(self, base_model: str, lora_rank: int = 0,
                                user_metadata: dict[str, str] | None = None, *,
                                tokenizer_model: str | None = None) -> RemoteTrainingClient:
        """A frozen copy of ``base_model`` on the server for reference logprobs: ``forward``
        only. (On the server a LoRA policy's reference shares the base weights, not a copy.)"""
        del lora_rank, tokenizer_model
        key = ("reference", base_model)
        if key not in self._clients:
            self._clients[key] = self._create(
                base_model, lora_rank=0, user_metadata=user_metadata, reference=True,
                job_id=self.config.reference_trainer_job_id)
        return self._clients[key]

    def create_base_training_client(self, base_model: str,
                                    user_metadata: dict[str, str] | None = None,
                                    ) -> RemoteTrainingClient:
        """A frozen base-model client for reference forward passes (see
        :meth:`create_reference_client`)."""
        return self.create_reference_client(base_model, 0, user_metadata)

    def create_lora_training_client(self, base_model: str, rank: int = 32,
                                    seed: int | None = None, train_mlp: bool = True,
                                    train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None,
                                    ) -> Any:
        """Tinker's LoRA constructor, answered by the server as for the ``tinker`` client
        (returns ``tinker``'s own ``TrainingClient``)."""
        return self._tinker.create_lora_training_client(
            base_model, rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn,
            train_unembed=train_unembed, user_metadata=user_metadata)

    def create_training_client_from_state(self, path: str,
                                          user_metadata: dict[str, str] | None = None) -> Any:
        """A new run from the weights of a train state (``tinker://<run>/weights/<name>``),
        fresh optimizer (``tinker``'s ``TrainingClient``)."""
        return self._tinker.create_training_client_from_state(path, user_metadata)

    def create_training_client_from_state_with_optimizer(
            self, path: str, user_metadata: dict[str, str] | None = None) -> Any:
        """Like :meth:`create_training_client_from_state`, optimizer state included."""
        return self._tinker.create_training_client_from_state_with_optimizer(
            path, user_metadata)

    def _create(self, base_model: str, **fields: Any) -> RemoteTrainingClient:
        from tinker import types as tinker_types
        from tinker.lib.api_future_impl import _APIFuture
        from tinker.lib.client_connection_pool_type import ClientConnectionPoolType
        from tinker.lib.public_interfaces.training_client import (
            TrainingClient as TinkerTrainingClient,
        )
        from tinker.lib.public_interfaces.training_client import fetch_training_info

        holder = self._tinker.holder
        session_id = holder.get_session_id()
        model_seq_id = holder.get_training_client_id()
        body = {"session_id": session_id, "model_seq_id": model_seq_id,
                "base_model": base_model, **{k: v for k, v in fields.items() if v is not None}}

        async def create() -> tuple[Any, dict[str, Any]]:
            started = time.time()
            with holder.aclient(ClientConnectionPoolType.TRAIN) as http:
                future = await http.post("/api/v1/homefire/create_trainer", body=body,
                                         cast_to=tinker_types.UntypedAPIFuture)
            created = await _APIFuture(_TrainerCreated, holder, future,
                                       request_start_time=started,
                                       request_type="CreateModel").result_async()
            info = await fetch_training_info(holder, created.model_id)
            client = TinkerTrainingClient(holder, model_seq_id=model_seq_id,
                                          model_id=created.model_id, info=info)
            return client, created.model_dump()

        client, created = holder.run_coroutine_threadsafe(create()).result()
        logger.info("%s job %s on %s (model %s%s)",
                    "reference" if fields.get("reference") else "trainer", created["job_id"],
                    self.base_url, created["model_id"],
                    ", attached live" if created["attached"] else "")
        return RemoteTrainingClient(self, client, base_model=base_model,
                                    job_id=created["job_id"], attached=created["attached"],
                                    step_at_attach=created["step"],
                                    frozen=bool(fields.get("reference")))

    # ---------------------------------------------------------------- sampling, REST
    def create_sampling_client(self, model_path: str | None = None,
                               base_model: str | None = None) -> RemoteSamplingClient:
        """A sampler on the server: on the sampler snapshot ``model_path``
        (``tinker://<run>/sampler_weights/<name>``), or on ``base_model`` (default: the
        config's)."""
        if model_path is None and base_model is None:
            base_model = self.config.base_model
        return RemoteSamplingClient(self._tinker.create_sampling_client(
            model_path=model_path, base_model=base_model).result())

    def create_rest_client(self) -> Any:
        """``tinker``'s ``RestClient`` on the server (training runs and checkpoints)."""
        return self._tinker.create_rest_client()

    def get_server_capabilities(self) -> Any:
        return self._tinker.get_server_capabilities()

    # ---------------------------------------------------------------- managed metadata
    def _policy_client(self) -> RemoteTrainingClient | None:
        return next((c for key, c in self._clients.items() if key[0] != "reference"), None)

    @property
    def trainer_job_id(self) -> str | None:
        """The policy trainer's job id (the one to reattach from another process)."""
        policy = self._policy_client()
        return policy.job_id if policy is not None else self.config.trainer_job_id

    @property
    def reference_trainer_job_id(self) -> str | None:
        reference = next((c for key, c in self._clients.items() if key[0] == "reference"), None)
        return reference.job_id if reference is not None else \
            self.config.reference_trainer_job_id

    @property
    def deployment_id(self) -> str | None:
        """None: the server runs its own deployment per base model."""
        return None

    def close(self, status: str = "success") -> None:
        """Drop the clients and finish this client's session on the server, which unloads
        its models unless another session reattached them (checkpoints always stay)."""
        self._clients.clear()
        self._tinker.close(status).result()

    def __enter__(self) -> RemoteServiceClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close("success" if exc_type is None else
                   "errored" if issubclass(exc_type, Exception) else "interrupted")


class _TrainerCreated(BaseModel):
    """The result of ``POST /api/v1/homefire/create_trainer``."""

    model_id: str
    job_id: str
    attached: bool = False
    step: int = 0


class RemoteTrainingClient:
    """A trainer on the server, with the in-process training client's names.

    Results are ``tinker``'s futures (``.result()``, or ``await``) of ``tinker``'s types."""

    def __init__(self, service: RemoteServiceClient, client: Any, *, base_model: str,
                 job_id: str, attached: bool, step_at_attach: int, frozen: bool) -> None:
        self.service = service
        self.tinker_client = client
        """The ``tinker.TrainingClient`` underneath (for what this wrapper does not name)."""
        self.base_model = base_model
        self.job_id = job_id
        self.frozen = frozen
        self.attached = attached
        """Whether this client shares a model the server already held (a live reattach)."""
        self.step_at_attach = step_at_attach
        """The trainer's optimizer steps when this client was made (non-zero on a live
        reattach, or once a state with optimizer is loaded by whoever created it)."""

    @property
    def model_id(self) -> str:
        return self.tinker_client.model_id

    def get_info(self) -> Any:
        return self.tinker_client.get_info()

    def get_tokenizer(self) -> Any:
        return self.tinker_client.get_tokenizer()

    def forward(self, data: Sequence[Any], loss_fn: str = "cross_entropy",
                loss_fn_config: dict[str, Any] | None = None) -> Any:
        return self.tinker_client.forward(_tinker_data(data), loss_fn, loss_fn_config)

    def forward_backward(self, data: Sequence[Any], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict[str, Any] | None = None) -> Any:
        self._check_trainable("forward_backward")
        return self.tinker_client.forward_backward(_tinker_data(data), loss_fn, loss_fn_config)

    def forward_backward_custom(self, data: Sequence[Any], loss_fn: Any) -> Any:
        """Your loss on the per-token logprobs (``tinker``'s two-pass form: a forward, your
        loss here, then a weighted backward on the server)."""
        self._check_trainable("forward_backward_custom")
        return self.tinker_client.forward_backward_custom(_tinker_data(data), loss_fn)

    def optim_step(self, adam_params: Any) -> Any:
        from tinker import types as tinker_types

        self._check_trainable("optim_step")
        params = as_adam_params(adam_params)
        return self.tinker_client.optim_step(tinker_types.AdamParams(
            learning_rate=params.learning_rate, beta1=params.beta1, beta2=params.beta2,
            eps=params.eps, weight_decay=params.weight_decay,
            grad_clip_norm=params.grad_clip_norm))

    def save_state(self, name: str, ttl_seconds: int | None = None,
                   user_metadata: dict[str, str] | None = None) -> Any:
        """A train state (weights + optimizer) in the server's store; ``.result().path`` is
        ``tinker://<job>/weights/<name>``."""
        return self.tinker_client.save_state(name, ttl_seconds=ttl_seconds,
                                             user_metadata=user_metadata)

    def load_state(self, path: str) -> Any:
        return self.tinker_client.load_state(path)

    def load_state_with_optimizer(self, path: str) -> Any:
        return self.tinker_client.load_state_with_optimizer(path)

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None) -> Any:
        return self.tinker_client.save_weights_for_sampler(name, ttl_seconds=ttl_seconds)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> Any:
        if name is None:
            return RemoteSamplingClient(
                self.tinker_client.save_weights_and_get_sampling_client())
        path = self.save_weights_for_sampler(name).result().path
        return self.create_sampling_client(path)

    def create_sampling_client(self, model_path: str) -> RemoteSamplingClient:
        return self.service.create_sampling_client(model_path)

    def _check_trainable(self, method: str) -> None:
        if self.frozen:
            from training.sdk.training_client import TrainingUsageError

            raise TrainingUsageError(f"{method} on a frozen reference client: it serves forward() "
                                     f"only; train with the policy client from "
                                     f"create_training_client")


class RemoteSamplingClient:
    """A sampler on the server that takes this package's or ``tinker``'s ``ModelInput`` and
    ``SamplingParams``; results are ``tinker``'s ``SampleResponse``."""

    def __init__(self, client: Any) -> None:
        self.tinker_client = client

    def sample(self, prompt: Any, num_samples: int = 1, sampling_params: Any = None, *,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0) -> Any:
        return self.tinker_client.sample(
            _tinker_model_input(prompt), num_samples, _tinker_sampling_params(sampling_params),
            include_prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs)

    def compute_logprobs(self, prompt: Any) -> Any:
        return self.tinker_client.compute_logprobs(_tinker_model_input(prompt))

    def get_tokenizer(self) -> Any:
        return self.tinker_client.get_tokenizer()
