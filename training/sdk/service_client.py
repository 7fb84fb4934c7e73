"""The service client: the entry point that creates trainer jobs on local compute."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from training.sdk import distributed
from training.sdk.choices import Choice
from training.sdk.deployments import DeploymentManager
from training.sdk.lora import apply_lora, lora_targets
from training.sdk.models import load_causal_lm, load_shared_base, load_tokenizer, model_source
from training.sdk.remote import is_trainer_server_url
from training.sdk.rest_client import RestClient
from training.sdk.sampling import DeploymentSampler, SamplingClient
from training.sdk.snapshots import DEFAULT_DELTA_ENCODING, DELTA_ENCODINGS
from training.sdk.store import CheckpointStore, parse_checkpoint_ref
from training.sdk.training_client import TrainingClient, resolve_autocast_dtype, resolve_device

logger = logging.getLogger(__name__)


class DeploymentCleanup(Choice):
    """What :meth:`ServiceClient.close` does to the managed deployment
    (``cleanup_deployment_on_close``; None leaves it running)."""

    scale_to_zero = "scale_to_zero"
    """Stop serving but keep the deployment (it starts again on the next use)."""
    delete = "delete"
    """Remove it."""


class ServiceClient:
    """Creates :class:`TrainingClient` jobs whose checkpoints live in one store.

    Args:
        storage_root: fsspec URL or path of the checkpoint store (default
            ``~/.cache/homefire/store``, or ``$HOMEFIRE_STORAGE_ROOT``).
        device: ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        mixed_precision: ``"auto"`` (bf16 autocast where the hardware is native), ``"bf16"``
            or ``"no"``. Master weights and optimizer state stay fp32 either way.
        account: the account segment of checkpoint and model names (default ``local``).
        sampler_dtype: dtype of sampler snapshot weights: ``"auto"`` (the dtype the base model
            is stored in, from its ``config.json``: bf16 for most hub models, fp32 for the
            built-in tiny ones), ``"bfloat16"``, ``"float32"``... bf16 snapshots are what
            inference runs and make deltas ~10x smaller at small learning rates; the trainer's
            fp32 master weights are unaffected.
        delta_encoding: how delta sampler snapshots are stored: ``"xor"`` (default: each
            tensor's ``new XOR reference``, zstd-compressed) or ``"ulp"`` (each element's move
            in ulps: 20-25% smaller, a little faster to hotload). Deployments read both.
        deploy_mgr: the :class:`DeploymentManager` that sampling clients use (default: one on
            this service's store, created on first use).
        deployment_id: the deployment that sampling clients use (default: created on first
            use, for the policy's base model).
        async_saves: training clients write train states in the background
            (:meth:`TrainingClient.save_state`); training only waits for the state to be copied.
        compile: run the policy's forward/backward through ``torch.compile`` (dynamic shapes):
            ~20-25% faster steps on CPU once compiled, after a one-off compile of a minute or
            more. Not combined with torchrun (FSDP2) yet: ignored there, with a warning.
        gradient_checkpointing: recompute each block's activations during backward instead of
            keeping them (training clients only): activation memory drops to about one
            block's, for roughly a third more compute; results are unchanged.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the service joins the process group and its
    training clients train data-parallel with FSDP2 (see :mod:`training.sdk.distributed`).
    """

    def __new__(cls, *args: Any, base_url: str | None = None, api_key: str | None = None,
                **kwargs: Any) -> Any:
        # ServiceClient(base_url=...): the seeds' "connect to an existing trainer by URL".
        if cls is ServiceClient and is_trainer_server_url(base_url):
            from training.sdk.remote import RemoteServiceClient

            if args or kwargs:
                raise TypeError(f"ServiceClient(base_url=...) connects to a trainer server, "
                                f"which has its own store and device: drop "
                                f"{', '.join([*map(repr, args), *kwargs])}")
            return RemoteServiceClient(base_url, api_key)
        return super().__new__(cls)

    def __init__(self, storage_root: str | None = None, *, device: str = "auto",
                 mixed_precision: str = "auto", account: str | None = None,
                 sampler_dtype: str = "auto", deploy_mgr: DeploymentManager | None = None,
                 deployment_id: str | None = None, async_saves: bool = False,
                 compile: bool = False, delta_encoding: str = DEFAULT_DELTA_ENCODING,
                 gradient_checkpointing: bool = False,
                 base_url: str | None = None, api_key: str | None = None) -> None:
        del base_url, api_key  # the hosted control plane's (a server's URL is taken by __new__)
        if delta_encoding not in DELTA_ENCODINGS:
            raise ValueError(f"delta_encoding={delta_encoding!r}: expected one of "
                             f"{sorted(DELTA_ENCODINGS)}")
        self.delta_encoding = delta_encoding
        self.store = CheckpointStore(storage_root)
        self.world = distributed.init_from_env(resolve_device(device))
        self.device = distributed.rank_device(resolve_device(device))
        self.async_saves = async_saves
        self.compile = compile
        self.gradient_checkpointing = gradient_checkpointing
        if compile and self.world.distributed:
            logger.warning("compile=True is ignored under torchrun (not combined with FSDP2 "
                           "yet): training runs eagerly")
            self.compile = False
        self.autocast_dtype = resolve_autocast_dtype(mixed_precision, self.device)
        self.account = account
        self.sampler_dtype = sampler_dtype
        self._clients: dict[tuple, TrainingClient] = {}
        self._deploy_mgr = deploy_mgr
        self.deployment_id = deployment_id
        """The managed deployment's id (set once it is provisioned, or given)."""
        self.config = ManagedConfig()
        """What :meth:`from_config` set up (defaults for a bare service)."""

    def create_training_client(self, base_model: str, lora_rank: int = 0,
                               user_metadata: dict[str, str] | None = None, *,
                               tokenizer_model: str | None = None,
                               job_id: str | None = None, lora_alpha: float | None = None,
                               lora_dropout: float = 0.0,
                               lora_target_modules: list[str] | None = None) -> TrainingClient:
        """A new trainer job for ``base_model`` (or, with ``job_id``, reattach to that job).

        ``lora_rank > 0`` trains a LoRA adapter (peft) on the frozen base instead of all weights;
        ``lora_alpha`` (default ``2 * lora_rank``), ``lora_dropout`` and ``lora_target_modules``
        (default: every attention and MLP projection) configure it. A reattached job keeps the
        adapter settings it was created with.

        Raises ValueError for a second client with the same ``(base_model, lora_rank)`` on this
        service: create a new ServiceClient for a separate trainer.
        """
        key = check_new_trainer(self._clients, base_model, lora_rank)
        lora = ({"alpha": lora_alpha if lora_alpha is not None else 2 * lora_rank,
                 "dropout": lora_dropout,
                 "target_modules": list(lora_target_modules) if lora_target_modules else None}
                if lora_rank > 0 else None)
        client = self._new_client(base_model, lora_rank, user_metadata,
                                  tokenizer_model or self.config.tokenizer_model,
                                  job_id=job_id or self.config.trainer_job_id, frozen=False,
                                  lora=lora)
        self._clients[key] = client
        return client

    def _new_client(self, base_model: str, lora_rank: int,
                    user_metadata: dict[str, str] | None, tokenizer_model: str | None,
                    job_id: str | None, frozen: bool,
                    lora: dict | None = None) -> TrainingClient:
        if job_id is not None:
            job = self.store.get_job(job_id)
            if job.base_model != base_model or job.lora_rank != lora_rank:
                raise ValueError(f"job {job_id!r} trains base_model={job.base_model!r}, "
                                 f"lora_rank={job.lora_rank}; cannot reattach it for "
                                 f"base_model={base_model!r}, lora_rank={lora_rank}")
        tokenizer = load_tokenizer(tokenizer_model or base_model, self.store)
        if (lora_rank > 0 or frozen) and not self.world.distributed:
            # The base weights never change: LoRA trainers and references share one copy.
            model = load_shared_base(base_model, self.store, dtype=torch.float32,
                                     device=self.device)
        else:
            model = load_causal_lm(base_model, self.store, dtype=torch.float32,
                                   device=self.device)
        if job_id is None:
            # One job for all ranks: rank 0 creates it, the others attach to it.
            job = distributed.on_main(lambda: self.store.create_job(
                base_model, lora_rank, account=self.account, user_metadata=user_metadata,
                lora=lora))
        if self.gradient_checkpointing and not frozen and hasattr(
                model, "gradient_checkpointing_enable"):
            # Recompute each block's activations in backward: less memory, ~30% more compute.
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if job.lora_rank > 0 and not frozen:
            settings = job.lora or {}
            model = apply_lora(model, job.lora_rank, settings.get("alpha"),
                               settings.get("dropout", 0.0), settings.get("target_modules"))
        distributed.on_main(lambda: self.store.cleanup_expired(job.job_id))
        model = distributed.shard_model(model, self.device, self.autocast_dtype)
        client = TrainingClient(store=self.store, job=job, model=model, tokenizer=tokenizer,
                                device=self.device, autocast_dtype=self.autocast_dtype,
                                frozen=frozen, async_saves=self.async_saves and not frozen,
                                compile=self.compile and not frozen,
                                delta_encoding=self.delta_encoding,
                                tokenizer_id=tokenizer_model or base_model, service=self,
                                sampler_dtype=_resolve_sampler_dtype(self.sampler_dtype,
                                                                     base_model, self.store))
        logger.info("%s job %s: %s (%.2fM params) on %s", "reference" if frozen else "trainer",
                    job.job_id, base_model, client.num_parameters() / 1e6, self.device)
        return client

    def create_reference_client(self, base_model: str, lora_rank: int = 0,
                                user_metadata: dict[str, str] | None = None, *,
                                tokenizer_model: str | None = None) -> TrainingClient:
        """A frozen copy of ``base_model`` for reference logprobs (KL, DPO): ``forward`` only.

        For a full-parameter policy it is a separate job with its own weights, so later policy
        updates never change it. For a LoRA policy (``lora_rank > 0``) created on this service it
        is the policy's model with the adapter disabled.
        """
        key = ("reference", base_model, lora_rank)
        if key in self._clients:
            return self._clients[key]
        policy = self._clients.get((base_model, lora_rank))
        if lora_rank > 0 and policy is not None:
            # The LoRA policy's own model with its adapter switched off is exactly the base:
            # no second copy of the weights.
            client = TrainingClient(store=self.store, job=policy.job, model=policy.model,
                                    tokenizer=policy.tokenizer, device=self.device,
                                    autocast_dtype=self.autocast_dtype, frozen=True,
                                    adapter_disabled=True, sampler_dtype=policy.sampler_dtype,
                                    tokenizer_id=policy.tokenizer_id, service=self)
        else:
            client = self._new_client(base_model, 0, user_metadata, tokenizer_model,
                                      job_id=self.config.reference_trainer_job_id, frozen=True)
        self._clients[key] = client
        return client

    def create_base_training_client(self, base_model: str,
                                    user_metadata: dict[str, str] | None = None,
                                    ) -> TrainingClient:
        """A frozen base-model client for reference forward passes (see
        :meth:`create_reference_client`); never call forward_backward or optim_step on it.

        With a LoRA policy on ``base_model`` in this service, it is that policy's model with the
        adapter disabled (no second copy); otherwise a frozen copy of the base."""
        lora_ranks = [rank for (name, rank) in (k for k in self._clients if len(k) == 2)
                      if name == base_model and rank > 0]
        return self.create_reference_client(base_model, lora_ranks[0] if lora_ranks else 0,
                                            user_metadata)

    # ---------------------------------------------------------------- Tinker's names
    def create_lora_training_client(self, base_model: str, rank: int = 32,
                                    seed: int | None = None, train_mlp: bool = True,
                                    train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None,
                                    ) -> TrainingClient:
        """Tinker's LoRA constructor: a rank-``rank`` adapter on the attention (``train_attn``)
        and MLP (``train_mlp``) projections and on the output layer (``train_unembed``), its
        initial weights drawn from ``seed`` (None: random). Returns the client, which is also
        a future of itself (``.result()``) as Tinker's is."""
        targets = lora_targets(self._model_shape(base_model), train_mlp=train_mlp,
                               train_attn=train_attn, train_unembed=train_unembed)
        with _seeded(seed):
            return self.create_training_client(base_model, lora_rank=rank,
                                               user_metadata=user_metadata,
                                               lora_target_modules=targets)

    def _model_config(self, base_model: str) -> Any:
        from transformers import AutoConfig

        with model_source(base_model, self.store) as source:
            return AutoConfig.from_pretrained(source)

    def _model_shape(self, base_model: str) -> torch.nn.Module:
        """The model's module tree (weights on the meta device) to choose LoRA targets from."""
        from transformers import AutoModelForCausalLM

        config = self._model_config(base_model)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)

    def create_training_client_from_state(self, path: str,
                                          user_metadata: dict[str, str] | None = None,
                                          ) -> TrainingClient:
        """A new run that starts from the weights of a train state (``save_state``'s path:
        ``cross_job://...``, ``tinker://<run>/weights/<name>`` or ``job:name``), with a fresh
        optimizer, as Tinker's does. Same base model and LoRA settings as the saving run."""
        return self._client_from_state(path, user_metadata, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(
            self, path: str, user_metadata: dict[str, str] | None = None) -> TrainingClient:
        """Like :meth:`create_training_client_from_state`, also restoring the optimizer's
        moments and step count."""
        return self._client_from_state(path, user_metadata, with_optimizer=True)

    def _client_from_state(self, path: str, user_metadata: dict[str, str] | None,
                           with_optimizer: bool) -> TrainingClient:
        job_id, name = parse_checkpoint_ref(path)
        meta = self.store.get_state(job_id, name)
        job = self.store.get_job(job_id)
        lora = job.lora or {}
        client = self.create_training_client(
            meta.base_model, lora_rank=job.lora_rank, user_metadata=user_metadata,
            lora_alpha=lora.get("alpha"), lora_dropout=lora.get("dropout", 0.0),
            lora_target_modules=lora.get("target_modules"))
        if with_optimizer:
            client.load_state_with_optimizer(path).result()
        else:
            client.load_state(path).result()
        return client

    def get_server_capabilities(self) -> Any:
        """Tinker's ``GetServerCapabilitiesResponse``: the models this service trains and
        samples (the built-in tiny ones, the promoted models in the store and the base models
        of its jobs; any local or hub model loads too)."""
        from tinker import types as tinker_types

        from training.sdk.registry import ModelRegistry
        from training.sdk.tiny_model import TINY_MODELS

        names = [*TINY_MODELS, *(m["name"] for m in ModelRegistry(self.store).list_models()),
                 *(self.store.get_job(j).base_model for j in self.store.list_jobs())]
        return tinker_types.GetServerCapabilitiesResponse(supported_models=[
            tinker_types.SupportedModel(model_name=name, trainable=True, sampleable=True)
            for name in dict.fromkeys(names)])

    def create_rest_client(self) -> RestClient:
        """Tinker's ``RestClient`` on this service's store (training runs and checkpoints)."""
        return RestClient(self.store, self.get_server_capabilities)

    @property
    def max_context_length(self) -> int | None:
        """The longest sequence the managed base model takes (``max_position_embeddings`` of
        its config), None before a base model is known."""
        policy = self._policy_client()
        base_model = self.config.base_model or (policy.base_model if policy else None)
        if base_model is None:
            return None
        return getattr(self._model_config(base_model), "max_position_embeddings", None)

    @property
    def reference_trainer_job_id(self) -> str | None:
        """The separate reference trainer's job id; None when there is none or the reference
        shares the LoRA policy's model (adapter disabled), as in the hosted SDK."""
        reference = next((c for key, c in self._clients.items() if key[0] == "reference"), None)
        if reference is None:
            return self.config.reference_trainer_job_id
        return None if reference.adapter_disabled else reference.job_id

    # ---------------------------------------------------------------- managed service
    @classmethod
    def from_config(cls, base_model: str, *, tokenizer_model: str | None = None,
                    lora_rank: int = 0, deployment_id: str | None = None,
                    create_deployment: bool = True, replica_count: int = 1,
                    trainer_job_id: str | None = None, learning_rate: float | None = None,
                    cleanup_trainer_on_close: bool = False,
                    cleanup_deployment_on_close: str | None = None,
                    storage_root: str | None = None, device: str = "auto",
                    mixed_precision: str = "auto", sampler_dtype: str = "auto",
                    delta_encoding: str = DEFAULT_DELTA_ENCODING,
                    deploy_mgr: DeploymentManager | None = None, engine: str = "auto",
                    reference_trainer_job_id: str | None = None,
                    api_key: str | None = None, base_url: str | None = None,
                    inference_url: str | None = None, training_shape_id: str | None = None,
                    reference_training_shape_id: str | None = None,
                    deployment_shape: str | None = None,
                    trainer_replica_count: int | None = None,
                    cleanup_reference_trainer_on_close: bool = True) -> ServiceClient:
        """A lazily provisioned service: trainer and deployment start on first use.

        The trainer starts at :meth:`create_training_client` (reattaching ``trainer_job_id`` if
        given); the deployment (``deployment_id``, created or reattached in ``deploy_mgr``)
        at the first sampling call. ``cleanup_deployment_on_close`` is ``"scale_to_zero"``,
        ``"delete"`` or None; ``cleanup_trainer_on_close`` frees the policy model on
        :meth:`close` (its checkpoints stay in the store). ``reference_trainer_job_id``
        reattaches :meth:`create_reference_client` to that job.

        ``base_url`` naming a trainer server (``scripts/trainer_server.py``; anything but the
        hosted ``https://api.fireworks.ai``) returns a
        :class:`~training.sdk.remote.RemoteServiceClient` on it: ``trainer_job_id`` then
        reattaches a job of that server from any process, and the store, device and deployment
        settings are the server's. ``api_key`` is the server's ``--api-key``. Otherwise
        ``api_key``, ``base_url`` and the hosted-only fields the seeds list (``inference_url``, ``training_shape_id``,
        ``reference_training_shape_id``, ``deployment_shape``, ``trainer_replica_count``,
        ``cleanup_reference_trainer_on_close``) are accepted and have no effect locally; any
        other keyword is a ``TypeError`` naming it.
        """
        config = ManagedConfig(
            base_model=base_model, tokenizer_model=tokenizer_model, lora_rank=lora_rank,
            create_deployment=create_deployment, replica_count=replica_count,
            trainer_job_id=trainer_job_id, learning_rate=learning_rate,
            cleanup_trainer_on_close=cleanup_trainer_on_close,
            cleanup_deployment_on_close=cleanup_deployment_on_close, engine=engine,
            reference_trainer_job_id=reference_trainer_job_id)
        if is_trainer_server_url(base_url):
            from training.sdk.remote import RemoteServiceClient

            return RemoteServiceClient(base_url, api_key, config=config)  # type: ignore[return-value]
        # Hosted-only settings: nothing to connect to or provision locally.
        del api_key, base_url, inference_url, training_shape_id, reference_training_shape_id
        del deployment_shape, trainer_replica_count, cleanup_reference_trainer_on_close
        if cleanup_deployment_on_close is not None:
            cleanup_deployment_on_close = DeploymentCleanup.parse(
                cleanup_deployment_on_close, "cleanup_deployment_on_close")
        service = cls(storage_root, device=device, mixed_precision=mixed_precision,
                      sampler_dtype=sampler_dtype, delta_encoding=delta_encoding,
                      deploy_mgr=deploy_mgr, deployment_id=deployment_id)
        service.config = config
        return service

    from_firetitan_config = from_config

    @property
    def trainer_job_id(self) -> str | None:
        """The policy trainer's job id (None before :meth:`create_training_client`)."""
        policy = self._policy_client()
        return policy.job_id if policy is not None else self.config.trainer_job_id

    @property
    def deploy_mgr(self) -> DeploymentManager:
        if self._deploy_mgr is None:
            self._deploy_mgr = DeploymentManager(self.store, device=str(self.device),
                                                 engine=self.config.engine)
        return self._deploy_mgr

    def _policy_client(self) -> TrainingClient | None:
        return next((c for key, c in self._clients.items() if key[0] != "reference"), None)

    def _deployment(self) -> str:
        """Provision (create or reattach) the managed deployment; returns its id."""
        if not self.config.create_deployment:
            raise RuntimeError("this service was configured with create_deployment=False: it "
                               "has no deployment to sample from; set create_deployment=True")
        policy = self._policy_client()
        base_model = self.config.base_model or (policy.base_model if policy else None)
        if base_model is None:
            raise RuntimeError("no base model to deploy: call create_training_client first, or "
                               "create the service with ServiceClient.from_config(base_model)")
        self.deployment_id = self.deploy_mgr.create_or_get(
            base_model, self.deployment_id or f"deploy-{secrets.token_hex(4)}",
            tokenizer_model=self.config.tokenizer_model, replica_count=self.config.replica_count,
        ).deployment_id
        return self.deployment_id

    def hotload_sampler_snapshot(self, model_path: str) -> list[str]:
        """Sync a sampler snapshot (``SaveSamplerResult.path``, or a bare snapshot name of the
        policy job) onto the managed deployment, loading its delta chain as needed; returns
        the identities loaded."""
        deployment_id = self._deployment()
        policy = self._policy_client()
        return self.deploy_mgr.sync(deployment_id, model_path,
                                    default_job_id=policy.job_id if policy else None)

    def create_sampling_client(self, model_path: str | None = None,
                               base_model: str | None = None) -> SamplingClient:
        """A Tinker-shaped sampler on the managed deployment, first synced to ``model_path``."""
        del base_model  # the deployment's base model is the service's
        deployment_id = self._deployment()
        if model_path is not None:
            self.hotload_sampler_snapshot(model_path)
        return SamplingClient(self.deploy_mgr, deployment_id, model_path)

    def create_deployment_sampler(self, model_path: str | None = None, tokenizer: Any = None,
                                  concurrency_controller: Any = None) -> DeploymentSampler:
        """The native sampler (``sample_with_tokens``) on the managed deployment."""
        deployment_id = self._deployment()
        if model_path is not None:
            self.hotload_sampler_snapshot(model_path)
        return DeploymentSampler(self.deploy_mgr, deployment_id, tokenizer=tokenizer,
                                 concurrency_controller=concurrency_controller)

    def close(self) -> None:
        """Apply the configured cleanups and drop the clients."""
        action = self.config.cleanup_deployment_on_close
        if action is not None and self.deployment_id is not None and self._deploy_mgr:
            live = {d.deployment_id for d in self._deploy_mgr.list_deployments()}
            if self.deployment_id in live:
                if action == "delete":
                    self._deploy_mgr.delete(self.deployment_id)
                else:
                    self._deploy_mgr.scale_to_zero(self.deployment_id)
        if self.config.cleanup_trainer_on_close:
            policy = self._policy_client()
            if policy is not None:
                policy.model = None  # free the weights; the job and its checkpoints remain
        self._clients.clear()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_new_trainer(clients: dict[tuple, Any], base_model: str, lora_rank: int) -> tuple:
    """The key of a new training client among a service's ``clients``, as the hosted SDK
    allows: one per ``(base_model, lora_rank)``, and a rank >= 0.

    Raises:
        ValueError: a second client with that key, or a negative rank.
    """
    key = (base_model, lora_rank)
    if key in clients:
        raise ValueError(f"this ServiceClient already has a training client for "
                         f"base_model={base_model!r}, lora_rank={lora_rank}; create a new "
                         f"ServiceClient for a separate trainer")
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
    return key


@dataclass
class ManagedConfig:
    """The provisioning settings of a service made by :meth:`ServiceClient.from_config`."""

    base_model: str | None = None
    tokenizer_model: str | None = None
    lora_rank: int = 0
    create_deployment: bool = True
    replica_count: int = 1
    trainer_job_id: str | None = None
    learning_rate: float | None = None
    """Recorded only: the learning rate is passed to each ``optim_step``."""
    cleanup_trainer_on_close: bool = False
    cleanup_deployment_on_close: str | None = None
    engine: str = "auto"
    reference_trainer_job_id: str | None = None
    """A reference trainer job to reattach (:meth:`ServiceClient.create_reference_client`)."""


def _resolve_sampler_dtype(sampler_dtype: str, base_model: str,
                           store: CheckpointStore) -> torch.dtype:
    if sampler_dtype != "auto":
        dtype = getattr(torch, sampler_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"sampler_dtype={sampler_dtype!r}: expected 'auto', 'bfloat16', "
                             f"'float16' or 'float32'")
        return dtype
    with model_source(base_model, store) as source:
        config_path = os.path.join(source, "config.json")
        if not os.path.isfile(config_path):
            return torch.float32  # a hub id served from the HF cache: keep the trainer's dtype
        with open(config_path) as f:
            config = json.load(f)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draw a new adapter's initial weights from ``seed`` without touching the caller's RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# The hosted SDK's names, so ported scripts only change their imports.
FiretitanServiceClient = ServiceClient
