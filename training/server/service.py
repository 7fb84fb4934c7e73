"""What the trainer server does behind each endpoint: sessions, models, sampling sessions.

A *model* is a training client (one trainer job in the store) created by ``create_model`` or
``load_weights``; its id is ``<session_id>:train:<model_seq_id>`` as the ``tinker`` client
derives it. A *sampling session* is a base model plus, optionally, a sampler snapshot; its
samples come from a deployment of that base model, synced to the snapshot before each request.
Asynchronous requests return a future at once (:class:`FutureStore`) and run on the
:class:`Scheduler` thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from training.sdk.deployments import DeploymentManager
from training.sdk.models import model_source
from training.sdk.service_client import ServiceClient
from training.sdk.store import (
    CheckpointStore,
    StoreError,
    make_tinker_path,
    parse_tinker_path,
    validate_name,
)
from training.sdk.training_client import TrainingClient, TrainingUsageError
from training.sdk.types import AdamParams, ModelInput, SamplingParams
from training.server.futures import FutureStore
from training.server.scheduler import Scheduler
from training.server.wire import (
    forward_backward_call,
    forward_backward_output_bytes,
    sample_response_bytes,
)

logger = logging.getLogger(__name__)

__all__ = ["RequestError", "TrainerService"]

PROTOBUF = "application/x-protobuf"
EPHEMERAL_TTL_S = 3600
"""Lifetime of the unnamed sampler snapshots of ``save_weights_and_get_sampling_client``."""


LOCAL_TENANT: str | None = None
"""The tenant of a server without API keys: one tenant (whoever can connect), whose runs are
every run in the store, made under the default account."""


def tenant_account(api_key: str | None) -> str | None:
    """The store account of the tenant an API key stands for: its runs are made under that
    account, and the other keys' runs are invisible to it."""
    if api_key is None:
        return LOCAL_TENANT
    return "t" + hashlib.sha256(api_key.encode()).hexdigest()[:15]


class RequestError(ValueError):
    """A request the server refuses (HTTP 4xx with Tinker's ``{"error", "category"}``)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Model:
    model_id: str
    session_id: str
    tenant: str | None
    client: TrainingClient
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Sampler:
    sampling_session_id: str
    tenant: str | None
    base_model: str
    model_path: str | None


class TrainerService:
    """The server's state. ``base_models`` are the models it trains and samples."""

    def __init__(self, base_models: Sequence[str], storage_root: str | None = None, *,
                 device: str = "auto", mixed_precision: str = "auto",
                 futures_path: str | None = None) -> None:
        if not base_models:
            raise ValueError("give the server at least one --base-model")
        self.base_models = list(dict.fromkeys(base_models))
        self.store = CheckpointStore(storage_root)
        self.device = device
        self.mixed_precision = mixed_precision
        if futures_path is None:
            base = (self.store.root if self.store.is_local
                    else os.path.expanduser("~/.cache/homefire/server"))
            os.makedirs(base, exist_ok=True)
            futures_path = os.path.join(base, "server_futures.sqlite")
        self.futures = FutureStore(futures_path)
        self.deploy_mgr = DeploymentManager(self.store, device=device, engine="auto")
        self.scheduler = Scheduler()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.models: dict[str, _Model] = {}
        self.samplers: dict[str, _Sampler] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()

    # ---------------------------------------------------------------- start-up
    def warm_up(self) -> None:
        """Load every base model's files once (the built-in ones are built here) so the first
        request does not pay for it; then :attr:`ready` is set."""
        for name in self.base_models:
            with model_source(name, self.store) as source:
                logger.info("base model %s: %s", name, source)
        self.ready.set()

    def close(self) -> None:
        self.scheduler.close()
        self.futures.close()

    # ---------------------------------------------------------------- sessions
    def create_session(self, body: dict[str, Any],
                       tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        session_id = f"s{secrets.token_hex(6)}"
        with self._lock:
            self.sessions[session_id] = {"user_metadata": body.get("user_metadata") or {},
                                         "tags": body.get("tags") or [], "tenant": tenant}
        return {"type": "create_session", "session_id": session_id}

    def finish_session(self, session_id: str, tenant: str | None = LOCAL_TENANT) -> None:
        """Forget a session's models and samplers (their checkpoints stay in the store)."""
        self._session(session_id, tenant)
        with self._lock:
            self.sessions.pop(session_id, None)
            for model_id in [m for m, e in self.models.items() if e.session_id == session_id]:
                del self.models[model_id]
            for sid in [s for s in self.samplers if s.startswith(f"{session_id}:")]:
                del self.samplers[sid]

    def _session(self, session_id: Any, tenant: str | None) -> str:
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None or session["tenant"] != tenant:
            raise RequestError(f"unknown session_id {session_id!r}: create a session first "
                               f"(the server may have restarted)", 404)
        return session_id

    def check_run(self, run_id: Any, tenant: str | None) -> str:
        """``run_id`` if it is a trainer job of ``tenant`` (another tenant's looks absent)."""
        if not isinstance(run_id, str):
            raise RequestError(f"expected a run id, got {run_id!r}")
        try:
            job = self.store.get_job(validate_name(run_id, "run id"))
        except (StoreError, ValueError):
            job = None
        if job is None or (tenant is not None and job.account != tenant):
            raise RequestError(f"no training run {run_id!r}", 404)
        return run_id

    # ---------------------------------------------------------------- futures
    def _future(self, kind: str, run: Callable[[], tuple[Any, str]], *, key: str,
                model_id: str | None = None, seq_id: int | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Accept a request: a future row, and ``run`` queued on ``key``; returns Tinker's
        ``UntypedAPIFuture``. A repeated ``(model_id, seq_id)`` returns the first future."""
        request_id, created = self.futures.create(kind, model_id, seq_id)
        if created:
            def task() -> None:
                started = time.perf_counter()
                try:
                    payload, content_type = run()
                except (RequestError, ValueError, TypeError, KeyError, StoreError,
                        TrainingUsageError) as e:
                    self.futures.fail(request_id, _message(e), "user")
                except Exception as e:  # noqa: BLE001 (reported to the client, and logged)
                    logger.exception("%s %s failed", kind, request_id)
                    self.futures.fail(request_id, f"{type(e).__name__}: {e}", "server")
                else:
                    self.futures.finish(request_id, payload, content_type)
                logger.debug("%s %s ran in %.1f ms", kind, request_id,
                             1000 * (time.perf_counter() - started))
            self.scheduler.submit(key, seq_id, task)
        return {"request_id": request_id, **({"model_id": model_id} if model_id else {}),
                **(extra or {})}

    # ---------------------------------------------------------------- models
    def _model(self, model_id: Any, tenant: str | None) -> _Model:
        model = self.models.get(model_id) if isinstance(model_id, str) else None
        if model is None or model.tenant != tenant:
            raise RequestError(f"model {model_id!r} is not loaded on this server (it was never "
                               f"created, its session finished, or the server restarted): "
                               f"create it again, or resume with "
                               f"create_training_client_from_state", 404)
        return model

    def _check_base_model(self, base_model: Any) -> str:
        if base_model not in self.base_models:
            raise RequestError(f"base_model {base_model!r} is not served here; this server "
                               f"trains {self.base_models} (start it with --base-model)")
        return base_model

    def _service_client(self, tenant: str | None) -> ServiceClient:
        return ServiceClient(self.store.root_url, device=self.device,
                             mixed_precision=self.mixed_precision, deploy_mgr=self.deploy_mgr,
                             account=tenant)

    def create_model(self, body: dict[str, Any],
                     tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        session_id = self._session(body.get("session_id"), tenant)
        base_model = self._check_base_model(body.get("base_model"))
        model_id = f"{session_id}:train:{int(body.get('model_seq_id', 0))}"
        lora = body.get("lora_config") or {}

        def run() -> tuple[Any, str]:
            service = self._service_client(tenant)
            if lora.get("rank"):
                client = service.create_lora_training_client(
                    base_model, rank=int(lora["rank"]), seed=lora.get("seed"),
                    train_mlp=lora.get("train_mlp", True), train_attn=lora.get("train_attn", True),
                    train_unembed=lora.get("train_unembed", True),
                    user_metadata=body.get("user_metadata"))
            else:
                client = service.create_training_client(
                    base_model, user_metadata=body.get("user_metadata"))
            self._add_model(model_id, session_id, tenant, client)
            return {"type": "create_model", "model_id": model_id}, "application/json"

        return self._future("create_model", run, key=f"{session_id}:create", model_id=model_id)

    def create_trainer(self, body: dict[str, Any],
                       tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        """homefire's own ``ServiceClient(base_url=...)``: a training client as the in-process
        service makes it (``lora_rank`` 0 trains every weight; LoRA alpha, dropout and target
        modules), a frozen reference (``reference``), or a reattach to trainer job ``job_id``.

        Reattaching a job whose model is loaded here (by any session of this tenant) shares
        that model, live weights and optimizer included, as reconnecting to a running hosted
        trainer does; a job that is not loaded (the server restarted) is loaded fresh from its
        base, to be restored from its last ``save_state`` as the in-process reattach is."""
        session_id = self._session(body.get("session_id"), tenant)
        base_model = self._check_base_model(body.get("base_model"))
        model_id = f"{session_id}:train:{int(body.get('model_seq_id', 0))}"
        lora_rank = int(body.get("lora_rank") or 0)
        job_id = body.get("job_id")
        if job_id is not None:
            job = self.store.get_job(self.check_run(job_id, tenant))
            if job.base_model != base_model or job.lora_rank != lora_rank:
                raise RequestError(f"job {job_id!r} trains base_model={job.base_model!r}, "
                                   f"lora_rank={job.lora_rank}; cannot reattach it for "
                                   f"base_model={base_model!r}, lora_rank={lora_rank}")

        def run() -> tuple[Any, str]:
            live = next((m.client for m in self.models.values() if m.tenant == tenant
                         and job_id is not None and m.client.job_id == job_id
                         and not m.client.frozen), None)
            service = self._service_client(tenant)
            if live is not None:
                client = live
            elif body.get("reference"):
                service.config.reference_trainer_job_id = job_id
                client = service.create_reference_client(base_model, 0)
            else:
                client = service.create_training_client(
                    base_model, lora_rank, user_metadata=body.get("user_metadata"),
                    job_id=job_id, lora_alpha=body.get("lora_alpha"),
                    lora_dropout=float(body.get("lora_dropout") or 0.0),
                    lora_target_modules=body.get("lora_target_modules"))
            self._add_model(model_id, session_id, tenant, client)
            return {"model_id": model_id, "job_id": client.job_id, "attached": live is not None,
                    "step": client.step}, "application/json"

        return self._future("create_trainer", run, key=f"{session_id}:create",
                            model_id=model_id)

    def _add_model(self, model_id: str, session_id: str, tenant: str | None,
                   client: TrainingClient) -> None:
        with self._lock:
            self.models[model_id] = _Model(model_id, session_id, tenant, client)
        self.scheduler.expect(model_id, 0)
        logger.info("model %s: job %s (%s, lora_rank %d)", model_id, client.job_id,
                    client.base_model, client.job.lora_rank)

    def get_info(self, body: dict[str, Any], tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        model = self._model(body.get("model_id"), tenant)
        info = model.client.get_info().model_dump(mode="json", exclude_none=True)
        info["model_id"] = model.model_id
        # The client loads the tokenizer by this name: a local directory loads offline.
        with model_source(model.client.tokenizer_id, self.store) as source:
            if os.path.isdir(source):
                info["model_data"]["tokenizer_id"] = source
        return info

    def weights_info(self, body: dict[str, Any], tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        job_id, _, _ = _tinker_path(body.get("tinker_path"))
        job = self.store.get_job(self.check_run(job_id, tenant))
        return {"base_model": job.base_model, "is_lora": job.lora_rank > 0,
                "lora_rank": job.lora_rank or None}

    def forward_backward(self, body: bytes, tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        call = forward_backward_call(body)
        model = self._model(call.model_id, tenant)

        def run() -> tuple[Any, str]:
            client = model.client
            if call.forward_only:
                output = client.forward(call.datums, call.loss_fn, call.loss_fn_config).result()
            else:
                output = client.forward_backward(call.datums, call.loss_fn,
                                                 call.loss_fn_config).result()
            return forward_backward_output_bytes(output), PROTOBUF

        return self._future("forward" if call.forward_only else "forward_backward", run,
                            key=model.model_id, model_id=model.model_id, seq_id=call.seq_id)

    def optim_step(self, body: dict[str, Any], tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        model = self._model(body.get("model_id"), tenant)
        params = body.get("adam_params")
        if not isinstance(params, dict):
            raise RequestError("optim_step needs adam_params (only AdamW is served)")
        adam = AdamParams(**{k: float(v) for k, v in params.items() if k in (
            "learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")})

        def run() -> tuple[Any, str]:
            metrics = model.client.optim_step(adam).result().metrics
            return {"metrics": {k: float(v) for k, v in metrics.items()}}, "application/json"

        return self._future("optim_step", run, key=model.model_id, model_id=model.model_id,
                            seq_id=_seq(body))

    def save_weights(self, body: dict[str, Any], tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        model = self._model(body.get("model_id"), tenant)
        name = body.get("path")

        def run() -> tuple[Any, str]:
            client = model.client
            client.save_state(name, ttl_seconds=body.get("ttl_seconds"),
                              user_metadata=body.get("user_metadata"),
                              overwrite=bool(body.get("overwrite", False))).result()
            client.wait_for_saves()
            return {"type": "save_weights",
                    "path": make_tinker_path(client.job_id, "state", name)}, "application/json"

        return self._future("save_weights", run, key=model.model_id, model_id=model.model_id,
                            seq_id=_seq(body))

    def save_weights_for_sampler(self, body: dict[str, Any], tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        model = self._model(body.get("model_id"), tenant)
        name = body.get("path")
        ephemeral = name is None

        def run() -> tuple[Any, str]:
            client = model.client
            if ephemeral:
                saved = client.save_weights_for_sampler_ext(
                    f"ephemeral-{client.step}", ttl_seconds=EPHEMERAL_TTL_S)
                sampler_id = (f"{model.session_id}:sample:"
                              f"{int(body.get('sampling_session_seq_id', 0))}")
                path = make_tinker_path(client.job_id, "sampler", saved.snapshot_name)
                self._add_sampler(sampler_id, tenant, client.base_model, path)
                return {"type": "save_weights_for_sampler",
                        "sampling_session_id": sampler_id}, "application/json"
            saved = client.save_weights_for_sampler_ext(name, ttl_seconds=body.get("ttl_seconds"))
            return {"type": "save_weights_for_sampler", "path": make_tinker_path(
                client.job_id, "sampler", saved.snapshot_name)}, "application/json"

        return self._future("save_weights_for_sampler", run, key=model.model_id,
                            model_id=model.model_id, seq_id=_seq(body))

    def load_weights(self, body: dict[str, Any], tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        path = body.get("path")
        self.check_run(_tinker_path(path)[0], tenant)
        with_optimizer = bool(body.get("optimizer", False))
        if body.get("model_id"):  # TrainingClient.load_state* on an existing model
            model = self._model(body["model_id"], tenant)

            def run_existing() -> tuple[Any, str]:
                load = (model.client.load_state_with_optimizer if with_optimizer
                        else model.client.load_state)
                load(path).result()
                return {"type": "load_weights", "path": path,
                        "model_id": model.model_id}, "application/json"

            return self._future("load_weights", run_existing, key=model.model_id,
                                model_id=model.model_id, seq_id=_seq(body))
        session_id = self._session(body.get("session_id"), tenant)
        model_id = f"{session_id}:train:{int(body.get('model_seq_id', 0))}"

        def run_new() -> tuple[Any, str]:
            job_id, _, _ = _tinker_path(path)
            self._check_base_model(self.store.get_job(job_id).base_model)
            service = self._service_client(tenant)
            client = (service.create_training_client_from_state_with_optimizer(path)
                      if with_optimizer else service.create_training_client_from_state(path))
            self._add_model(model_id, session_id, tenant, client)
            return {"type": "load_weights", "path": path, "model_id": model_id}, \
                "application/json"

        return self._future("load_weights", run_new, key=f"{session_id}:create",
                            model_id=model_id)

    # ---------------------------------------------------------------- sampling
    def _add_sampler(self, sampler_id: str, tenant: str | None, base_model: str,
                     model_path: str | None) -> None:
        with self._lock:
            self.samplers[sampler_id] = _Sampler(sampler_id, tenant, base_model, model_path)

    def _sampler(self, sampler_id: Any, tenant: str | None) -> _Sampler:
        sampler = self.samplers.get(sampler_id) if isinstance(sampler_id, str) else None
        if sampler is None or sampler.tenant != tenant:
            raise RequestError(f"unknown sampling session {sampler_id!r} (the server may have "
                               f"restarted): create a sampling client again", 404)
        return sampler

    def create_sampling_session(self, body: dict[str, Any],
                                tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        session_id = self._session(body.get("session_id"), tenant)
        model_path, base_model = body.get("model_path"), body.get("base_model")
        if model_path is not None:
            job_id, kind, _ = _tinker_path(model_path)
            self.check_run(job_id, tenant)
            if kind != "sampler":
                raise RequestError(f"model_path {model_path!r} is a train state; sample from a "
                                   f"save_weights_for_sampler path (.../sampler_weights/...)")
            base_model = self.store.get_job(job_id).base_model
        self._check_base_model(base_model)
        sampler_id = f"{session_id}:sample:{int(body.get('sampling_session_seq_id', 0))}"
        self._add_sampler(sampler_id, tenant, base_model, model_path)
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    def get_sampler(self, sampler_id: str, tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        sampler = self._sampler(sampler_id, tenant)
        return {"sampler_id": sampler_id, "base_model": sampler.base_model,
                **({"model_path": sampler.model_path} if sampler.model_path else {})}

    def asample(self, body: dict[str, Any], tenant: str | None = LOCAL_TENANT) -> dict[str, Any]:
        sampler = self._sampler(body.get("sampling_session_id"), tenant)
        num_samples = int(body.get("num_samples", 1))
        if not 1 <= num_samples <= 1024:
            raise RequestError(f"num_samples must be between 1 and 1024, got {num_samples}")
        prompt = ModelInput.from_ints(
            [t for chunk in (body.get("prompt") or {}).get("chunks", [])
             for t in chunk.get("tokens", [])])
        if prompt.length == 0:
            raise RequestError("the prompt has no tokens")
        params = SamplingParams(**{k: v for k, v in (body.get("sampling_params") or {}).items()
                                   if k in ("max_tokens", "temperature", "top_p", "top_k",
                                            "seed", "stop") and v is not None})
        sequence_ids = [f"{sampler.sampling_session_id}:{secrets.token_hex(4)}:{i}"
                        for i in range(num_samples)]

        def run() -> tuple[Any, str]:
            from training.sdk.sampling import SamplingClient

            deployment_id = self._deployment(sampler.base_model)
            if sampler.model_path is not None:
                self.deploy_mgr.sync(deployment_id, sampler.model_path)
            response = SamplingClient(self.deploy_mgr, deployment_id).sample(
                prompt, num_samples, params,
                include_prompt_logprobs=bool(body.get("prompt_logprobs", False)),
                topk_prompt_logprobs=int(body.get("topk_prompt_logprobs") or 0),
                topk_sample_logprobs=int(body.get("topk_sample_logprobs") or 0)).result()
            return sample_response_bytes(response), PROTOBUF

        return self._future("sample", run, key=sampler.sampling_session_id,
                            extra={"sample_sequence_ids": sequence_ids})

    def _deployment(self, base_model: str) -> str:
        """The deployment serving ``base_model`` (one per base model, created on first use)."""
        deployment_id = "serve-" + "".join(c if c.isalnum() else "-" for c in base_model)[:60]
        return self.deploy_mgr.create_or_get(base_model, deployment_id).deployment_id

    # ---------------------------------------------------------------- capabilities
    def capabilities(self) -> dict[str, Any]:
        return {"supported_models": [{"model_name": name, "trainable": True,
                                      "sampleable": True} for name in self.base_models]}


def _seq(body: dict[str, Any]) -> int | None:
    seq = body.get("seq_id")
    return int(seq) if seq is not None else None


def _tinker_path(path: Any) -> tuple[str, str, str]:
    if not isinstance(path, str):
        raise RequestError(f"expected a tinker:// path, got {path!r}")
    try:
        return parse_tinker_path(path)
    except ValueError as e:
        raise RequestError(str(e)) from None


def _message(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, KeyError) and error.args:  # KeyError's str() adds quotes
        text = str(error.args[0])
    return text or type(error).__name__

