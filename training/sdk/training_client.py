"""The training client: a trainer job running on local torch compute, with Tinker's method set.

Calls execute in the caller's thread, in call order, and return already-completed futures so code
written for the hosted API (``client.forward_backward(...).result()``) runs unchanged. Errors are
raised at the call, never parked in a future that nobody reads.
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from training.sdk import distributed
from training.sdk.distributed import collective
from training.sdk.futures import AwaitableSelf, async_twins, completed
from training.sdk.hf_quiet import progress_bars_disabled
from training.sdk.lora import adapter_disabled, load_adapter_weights, save_adapter
from training.sdk.losses import BUILTIN_LOSSES, check_loss_call, loss_tokens
from training.sdk.models import own_weights
from training.sdk.packed_attention import packed_attention, supports_packed_attention
from training.sdk.packing import (
    PackedBatch,
    pack_routing,
    pack_sequences,
    token_logprobs,
    unpack_routing,
)
from training.sdk.routing import capture_routing, moe_routers, replay_routing
from training.sdk.snapshots import (
    DEFAULT_DELTA_ENCODING,
    DELTA_ENCODINGS,
    SnapshotType,
    encode_delta,
    make_snapshot_identity,
    sampler_weights,
    write_base_snapshot,
)
from training.sdk.store import (
    CheckpointStore,
    EntryMeta,
    JobRecord,
    StoreError,
    make_cross_job_ref,
    parse_checkpoint_ref,
    validate_name,
)
from training.sdk.train_state import (  # StateCorruptError: its import path before the move
    StagingBuffers,
    StateCorruptError,  # noqa: F401
    dcp_call,
    train_state_dict,
    user_state_key,
    verify_state_checksums,
    write_state_checksums,
)
from training.sdk.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GradAccNormalization,
    LoadStateResponse,
    MixedPrecision,
    OptimStepResponse,
    Pooling,
    SaveSamplerResult,
    SaveStateResponse,
    TensorData,
    as_adam_params,
    as_datum,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

CustomLossFn = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def _check_adam_params(params: AdamParams) -> None:
    checks = {"learning_rate": params.learning_rate >= 0, "beta1": 0 <= params.beta1 < 1,
              "beta2": 0 <= params.beta2 < 1, "eps": params.eps > 0,
              "weight_decay": params.weight_decay >= 0,
              "grad_clip_norm": params.grad_clip_norm >= 0}
    for name, ok in checks.items():
        value = getattr(params, name)
        if not (math.isfinite(value) and ok):
            raise ValueError(f"AdamParams.{name}={value} is out of range: learning_rate, "
                             f"weight_decay and grad_clip_norm must be finite and >= 0, beta1 "
                             f"and beta2 in [0, 1), eps > 0")


class NonFiniteWeightsError(ValueError):
    """Weights with NaN or infinite values would be saved for inference or promoted."""


def check_finite_weights(weights: Any, what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first floating tensor of ``weights`` (a
    name -> tensor mapping) that holds a NaN or an infinity."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeightsError(
                f"{what}: tensor {name!r} has {bad} NaN/infinite values of {tensor.numel()}; "
                f"refusing to save weights no one can use. Resume from an earlier checkpoint "
                f"with a lower learning rate or gradient clipping")


class TrainingUsageError(RuntimeError):
    """A call the training client's state does not allow (``optim_step`` before any backward,
    training a frozen reference client); the message says what to call instead."""


def _position_inputs(index: int, datum: Datum, logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    """A datum's per-position ``loss_fn_inputs`` as float tensors shaped like its logprobs
    (a clip threshold may also be one value); ``target_tokens`` and ``routing_matrices`` are
    read elsewhere."""
    inputs = {}
    for key, value in datum.loss_fn_inputs.items():
        if key in ("target_tokens", "routing_matrices"):
            continue
        tensor = value.to_torch().to(logprobs.device, torch.float32)
        if tensor.numel() == logprobs.numel():
            tensor = tensor.reshape(logprobs.shape)
        elif not (tensor.numel() == 1 and key.startswith("clip_")):
            raise ValueError(f"datum {index}: loss_fn_inputs[{key!r}] has {tensor.numel()} "
                             f"entries, model_input has {logprobs.numel()} tokens; they must "
                             f"match")
        inputs[key] = tensor
    return inputs


_done = completed


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_autocast_dtype(mixed_precision: MixedPrecision | str,
                           device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it natively (``"auto"``), always, or never."""
    mixed_precision = MixedPrecision.parse(mixed_precision, "mixed_precision")
    if mixed_precision == MixedPrecision.no:
        return None
    if mixed_precision == MixedPrecision.bf16:
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # Without native bf16 (AVX-512 BF16 / AMX) the CPU emulates it and autocast is slower.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


@async_twins("forward", "forward_backward", "forward_backward_custom", "optim_step",
             "save_state", "load_state", "load_state_with_optimizer", "save_weights_for_sampler",
             "load_adapter", "get_info", "create_sampling_client",
             "save_weights_and_get_sampling_client")
class TrainingClient(AwaitableSelf):
    """A trainer job: one model, its optimizer, and its checkpoints in the store.

    Create it with :meth:`training.sdk.ServiceClient.create_training_client` (or Tinker's
    ``create_lora_training_client`` / ``create_training_client_from_state``). As in ``tinker``,
    the client is also a future of itself (``.result()``, ``await``), and the RPC-like methods
    have ``*_async`` twins whose awaited value is the future the method returns.
    """

    def __init__(self, *, store: CheckpointStore, job: JobRecord, model: torch.nn.Module,
                 tokenizer: Any, device: torch.device,
                 autocast_dtype: torch.dtype | None, frozen: bool = False,
                 adapter_disabled: bool = False,
                 sampler_dtype: torch.dtype | None = None, async_saves: bool = False,
                 compile: bool = False, delta_encoding: str = DEFAULT_DELTA_ENCODING,
                 tokenizer_id: str | None = None, service: Any = None) -> None:
        self.store = store
        self.tokenizer_id = tokenizer_id or job.base_model
        """The name the tokenizer was loaded by (``tokenizer_model``, else ``base_model``)."""
        self.service = service
        """The :class:`~training.sdk.ServiceClient` that created this client (its deployment
        serves :meth:`create_sampling_client`)."""
        self.job = job
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.world = distributed.world()
        """This process's rank among the run's processes (a world of one without torchrun)."""
        self.session_id = distributed.broadcast_object(secrets.token_hex(4))
        """8 hex chars that qualify this session's sampler snapshot names."""
        self._optimizer: torch.optim.Optimizer | None = None
        self._step = 0
        self._pending_loss_tokens = 0
        self._pending_sequences = 0
        self._pending_backward = False
        self.async_saves = async_saves
        """``save_state`` writes in the background (see :meth:`save_state`)."""
        # The compiled module shares the model's parameters: state dicts, checkpoints and
        # snapshots keep using self.model.
        score = functools.partial(token_logprobs, model)
        # Compiling the loss with the model lets inductor fuse the fp32 upcast, log-softmax and
        # gather of the logits into the lm_head's epilogue (and the same in backward).
        self._eager_token_logprobs = score
        self._token_logprobs = torch.compile(score, dynamic=True) if compile else score
        # Attention per document where the model allows it (no dense mask, no padding but
        # rounding); otherwise rows with block-diagonal masks.
        self._per_document_attention = supports_packed_attention(model, device)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        # Measured on CPU (10M model, d=256): a 416-wide masked row cost 1.10x a 256-wide one
        # per position, i.e. ~5 * hidden_size.
        self._attention_cost = 5.0 * hidden if isinstance(hidden, int) else None
        self._pending_saves: list[Future[SaveStateResponse]] = []
        self._staging = StagingBuffers()
        self._staged: threading.Event | None = None
        self.save_stall_s = 0.0
        """Seconds training has waited for background saves so far: their ``save_state`` calls
        plus ``optim_step`` waiting for the state copy (a benchmark figure)."""
        self._state_dicts: dict[str, Any] = {}
        self._state_dicts_key: tuple[int, int] | None = None
        self.frozen = frozen
        """A reference client: forward passes only (no gradients, no optimizer, no saves)."""
        self.sampler_dtype = sampler_dtype or next(model.parameters()).dtype
        """dtype of sampler snapshot weights (the trainer's own weights stay as they are)."""
        self._sampler_chain: _SamplerChainHead | None = None
        if delta_encoding not in DELTA_ENCODINGS:
            raise ValueError(f"delta_encoding={delta_encoding!r}: expected one of "
                             f"{sorted(DELTA_ENCODINGS)}")
        self.delta_encoding = delta_encoding
        """How delta snapshots are encoded: ``"xor"`` or ``"ulp"`` (see
        :data:`training.sdk.snapshots.DELTA_ENCODINGS`)."""
        self.adapter_disabled = adapter_disabled
        """Forward passes run the base model under the LoRA adapter (a LoRA policy's reference
        shares the policy's model instead of loading a second copy)."""
        if frozen and not adapter_disabled:
            self.model.requires_grad_(False)
        self.model.train()

    # ---------------------------------------------------------------- identity
    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def base_model(self) -> str:
        return self.job.base_model

    @property
    def step(self) -> int:
        """Optimizer steps taken (restored by ``load_state_with_optimizer``)."""
        return self._step

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_info(self) -> Any:
        """Tinker's ``GetInfoResponse``: ``model_id`` (the job id), ``model_data`` (``arch``,
        ``model_name`` = base model, ``tokenizer_id``), ``is_lora``, ``lora_rank``."""
        from tinker import types as tinker_types

        config = getattr(self.model, "config", None)
        archs = getattr(config, "architectures", None) or [type(self.model).__name__]
        lora = self.job.lora_rank > 0
        return tinker_types.GetInfoResponse(
            model_id=self.job_id, model_name=self.base_model, is_lora=lora,
            lora_rank=self.job.lora_rank if lora else None,
            model_data=tinker_types.ModelData(arch=archs[0], model_name=self.base_model,
                                              tokenizer_id=self.tokenizer_id))

    def create_sampling_client(self, model_path: str, retry_config: Any = None) -> Any:
        """A :class:`~training.sdk.SamplingClient` on this service's deployment, synced to the
        sampler snapshot ``model_path`` (``SaveSamplerResult.path``, ``sampler://...`` or
        ``tinker://<job>/sampler_weights/<name>``). ``retry_config`` is accepted and unused."""
        return self._service_for("create_sampling_client").create_sampling_client(model_path)

    def save_weights_and_get_sampling_client(self, name: str | None = None,
                                             retry_config: Any = None) -> Any:
        """Save the current weights as a sampler snapshot and return a sampling client on them.

        As in Tinker the snapshot is ephemeral: without ``name`` it is named
        ``ephemeral-<step>`` and expires after an hour (a named one is kept)."""
        saved = self.save_weights_for_sampler_ext(
            name or f"ephemeral-{self._step}", ttl_seconds=None if name else 3600)
        return self.create_sampling_client(saved.path)

    def _service_for(self, method: str) -> Any:
        if self.service is None:
            raise TrainingUsageError(f"{method} needs the ServiceClient that created this training "
                               f"client (its deployment serves the samples); this client was "
                               f"built without one")
        return self.service

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.model.parameters()
                   if p.requires_grad or not trainable_only)

    # ---------------------------------------------------------------- forward passes
    def _logprobs(self, datums: Sequence[Datum], *, require_targets: bool,
                  routing_out: list[torch.Tensor] | None = None,
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor | None]:
        """Per-datum log-probabilities (with grad if enabled), weights, and a graph anchor.

        With ``target_tokens``, entry j is ``log p(target_j | input_<=j)``. Without (weight-based
        datums), entry j is ``log p(token_j | tokens_<j)`` and entry 0 is 0.

        Under torchrun each rank runs the model on its contiguous share of the datums only and
        receives the other ranks' log-probs (detached): every rank then sees the whole batch, and
        a loss over it sends gradient through this rank's share alone, so the summed gradients
        of all ranks are exactly the gradient of that loss. The anchor (None for one process) is
        a zero that depends on every parameter this rank ran: add it to the loss so that each
        rank takes part in FSDP's gradient reduction even with no datum of its own.

        Datums with ``routing_matrices`` run with that expert routing (MoE models, see
        :mod:`training.sdk.routing`); ``routing_out`` (a list) receives each datum's own
        routing matrix (this rank's datums under torchrun).
        """
        if not datums:
            raise ValueError("no datums given")
        inputs, targets, shifted, weights, routing = self._prepare(datums, require_targets)
        per_datum, anchor = self._sharded(
            inputs, lambda share: self._run_model(
                inputs[share], targets[share], shifted[share],
                routing=None if routing is None else routing[share], routing_out=routing_out),
            lambda: self._run_model([[0]], [torch.zeros(1, dtype=torch.long)], [False]))
        return per_datum, weights, anchor

    def _embeddings(self, datums: Sequence[Datum], pooling: str,
                    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Per-datum pooled final hidden states ``[hidden_size]`` (fp32, with grad if enabled)
        and the graph anchor of :meth:`_logprobs` (same sharding under torchrun)."""
        if not datums:
            raise ValueError("no datums given")
        inputs = []
        for i, datum in enumerate(datums):
            tokens = datum.model_input.to_ints()
            if not tokens:
                raise ValueError(f"datum {i} has an empty model_input")
            inputs.append(tokens)
        return self._sharded(inputs, lambda share: self._run_embeddings(inputs[share], pooling),
                             lambda: self._run_embeddings([[0]], pooling))

    def _sharded(self, inputs: list[list[int]],
                 run_share: Callable[[slice], list[torch.Tensor]],
                 run_dummy: Callable[[], list[torch.Tensor]],
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``run_share(slice)`` over all datums (one process), or over this rank's share with
        the other ranks' results received detached (torchrun; see :meth:`_logprobs`)."""
        if not self.world.distributed:
            return run_share(slice(None)), None
        start, stop = distributed.shard_range(len(inputs), self.world)
        if start < stop:
            local = run_share(slice(start, stop))
            anchor = torch.stack([t.sum() for t in local]).sum() * 0.0
        else:  # fewer datums than ranks: run one token so FSDP's collectives still match
            local = []
            anchor = run_dummy()[0].sum() * 0.0
        shares = distributed.all_gather_object([t.detach().float().cpu() for t in local])
        per_datum: list[torch.Tensor] = []
        for rank, share in enumerate(shares):
            per_datum.extend(local if rank == self.world.rank
                             else [t.to(self.device) for t in share])
        return per_datum, anchor

    def _prepare(self, datums: Sequence[Datum], require_targets: bool,
                 ) -> tuple[list[list[int]], list[torch.Tensor], list[bool],
                            list[torch.Tensor | None], list[torch.Tensor] | None]:
        """Check every datum (on every rank, so all of them raise the same error) and unpack
        token ids, targets (shifted inputs for weight-only datums), weights and routing
        matrices (None when no datum has one)."""
        routing = self._routing_matrices(datums)
        inputs: list[list[int]] = []
        targets: list[torch.Tensor] = []
        shifted: list[bool] = []
        weights: list[torch.Tensor | None] = []
        for i, datum in enumerate(datums):
            tokens = datum.model_input.to_ints()
            if not tokens:
                raise ValueError(f"datum {i} has an empty model_input")
            inputs.append(tokens)
            w = datum.loss_fn_inputs.get("weights")
            if "target_tokens" in datum.loss_fn_inputs:
                tgt = datum.loss_fn_inputs["target_tokens"].to_torch().long().reshape(-1)
                if tgt.numel() != len(tokens):
                    raise ValueError(f"datum {i}: target_tokens has {tgt.numel()} entries, "
                                     f"model_input has {len(tokens)} tokens; they must match")
                targets.append(tgt)
                shifted.append(False)
            elif require_targets:
                raise ValueError(
                    f"datum {i} has no 'target_tokens' in loss_fn_inputs: the built-in "
                    f"'cross_entropy' loss needs them. Weight-only datums "
                    f"(datum_from_model_input_weights) work with forward_backward_custom.")
            else:
                targets.append(torch.tensor([*tokens[1:], 0], dtype=torch.long))
                shifted.append(True)
            if w is not None:
                w = w.to_torch().float().reshape(-1)
                if w.numel() != len(tokens):
                    raise ValueError(f"datum {i}: weights has {w.numel()} entries, model_input "
                                     f"has {len(tokens)} tokens; they must match")
            weights.append(w)
        return inputs, targets, shifted, weights, routing

    def _routing_matrices(self, datums: Sequence[Datum]) -> list[torch.Tensor] | None:
        """Each datum's ``routing_matrices`` as ``[tokens, moe_layers, top_k]`` int64 (all of
        them or none)."""
        given = ["routing_matrices" in d.loss_fn_inputs for d in datums]
        if not any(given):
            return None
        if not all(given):
            raise ValueError(f"datums {[i for i, g in enumerate(given) if not g]} have no "
                             f"routing_matrices but others do: give them to every datum of a "
                             f"call or to none")
        routers = moe_routers(self.model)
        if not routers:
            raise ValueError(f"routing_matrices given, but {self.base_model} has no "
                             f"mixture-of-experts layers to route")
        if self._token_logprobs is not self._eager_token_logprobs:
            raise ValueError("routing replay does not run under compile=True; create the "
                             "service without compile")
        matrices = []
        for i, datum in enumerate(datums):
            matrix = datum.loss_fn_inputs["routing_matrices"].to_torch().long()
            expected = (datum.model_input.length, len(routers), routers[0].top_k)
            if tuple(matrix.shape) != expected:
                raise ValueError(f"datum {i}: routing_matrices has shape {tuple(matrix.shape)}; "
                                 f"expected [tokens, moe_layers, top_k] = {list(expected)}")
            matrices.append(matrix)
        return matrices

    def _run_model(self, inputs: list[list[int]], targets: list[torch.Tensor],
                   shifted: list[bool], routing: list[torch.Tensor] | None = None,
                   routing_out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """One packed forward pass; the log-prob of each sequence's targets (with ``routing``,
        under those expert choices; ``routing_out`` receives each sequence's own)."""
        batch = self._pack(inputs, targets)
        mask = batch.attention_mask
        replay = (nullcontext() if routing is None
                  else replay_routing(self.model, pack_routing(routing, batch)))
        capture = (capture_routing(self.model) if routing_out is not None
                   else nullcontext(None))
        with self._forward_context(), replay, capture as captured:
            token_logprobs = self._token_logprobs(batch.input_ids.to(self.device),
                                                  batch.position_ids.to(self.device),
                                                  None if mask is None else mask.to(self.device),
                                                  batch.target_ids.to(self.device))
        if captured:
            routing_out.extend(unpack_routing(captured, batch))
        per_datum = []
        for i, (row, offset, length) in enumerate(batch.placements):
            lp = token_logprobs[row, offset:offset + length]
            if shifted[i]:
                lp = torch.cat([lp.new_zeros(1), lp[:-1]])
            per_datum.append(lp)
        return per_datum

    def _run_embeddings(self, inputs: list[list[int]], pooling: str) -> list[torch.Tensor]:
        """One packed forward pass; each sequence's final hidden states (after the last norm),
        mean-pooled or its last position's, in fp32."""
        batch = self._pack(inputs, [torch.zeros(len(t), dtype=torch.long) for t in inputs])
        mask = batch.attention_mask
        with self._forward_context():
            # logits_to_keep=1: the vocabulary projection runs for one position only.
            hidden = self.model(input_ids=batch.input_ids.to(self.device),
                                position_ids=batch.position_ids.to(self.device),
                                attention_mask=None if mask is None else mask.to(self.device),
                                output_hidden_states=True, logits_to_keep=1,
                                use_cache=False).hidden_states[-1]
        pooled = []
        for row, offset, length in batch.placements:
            span = hidden[row, offset:offset + length].float()
            pooled.append(span.mean(dim=0) if pooling == Pooling.mean else span[-1])
        return pooled

    def _pack(self, inputs: list[list[int]], targets: list[torch.Tensor]) -> PackedBatch:
        return pack_sequences(inputs, targets, pad_id=self.tokenizer.pad_token_id or 0,
                              attention_cost=self._attention_cost,
                              per_document_attention=self._per_document_attention)

    @contextmanager
    def _forward_context(self) -> Iterator[None]:
        """What every forward pass runs under: the adapter switched off for a LoRA reference,
        per-document attention, a collective's error handling and bf16 autocast."""
        adapter_off = adapter_disabled(self.model) if self.adapter_disabled else nullcontext()
        attention = (packed_attention(self.model) if self._per_document_attention
                     else nullcontext())
        with adapter_off, attention, collective("running the forward pass"), torch.autocast(
                self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                enabled=self.autocast_dtype is not None):
            yield

    def _builtin_loss(self, data: Sequence[Any], loss_fn: str,
                      loss_fn_config: dict[str, Any] | None,
                      ) -> tuple[torch.Tensor, ForwardBackwardOutput]:
        """The summed loss of a built-in loss (:mod:`training.sdk.losses`) and its output."""
        datums = [as_datum(d) for d in data]
        config = check_loss_call(loss_fn, loss_fn_config, [d.loss_fn_inputs for d in datums])
        per_position = BUILTIN_LOSSES[loss_fn].per_position
        # An MoE model's forward passes report their routing (the reference's, for replay).
        routing: list[torch.Tensor] | None = (
            [] if moe_routers(self.model) and not self.world.distributed else None)
        logprobs, _, anchor = self._logprobs(datums, require_targets=True, routing_out=routing)
        loss = logprobs[0].new_zeros(()) if anchor is None else anchor
        tokens = 0
        for i, (datum, lp) in enumerate(zip(datums, logprobs, strict=True)):
            inputs = _position_inputs(i, datum, lp)
            loss = loss + per_position(lp, inputs, config).sum()
            tokens += loss_tokens(loss_fn, inputs, lp.numel())
        output = ForwardBackwardOutput(
            loss_fn_output_type=loss_fn,
            loss_fn_outputs=[
                {"logprobs": TensorData.from_torch(lp.detach().float()),
                 **({"routing_matrices": TensorData.from_torch(routing[i])} if routing else {})}
                for i, lp in enumerate(logprobs)],
            metrics={"loss:sum": float(loss.detach()), "num_loss_tokens": float(tokens),
                     "num_sequences": float(len(datums))},
        )
        return loss, output

    def forward(self, data: Sequence[Any], loss_fn: str = "cross_entropy",
                loss_fn_config: dict[str, Any] | None = None,
                ) -> Future[ForwardBackwardOutput]:
        """Forward pass only (no gradients): per-token logprobs and the loss metrics."""
        with torch.no_grad():
            _, output = self._builtin_loss(data, loss_fn, loss_fn_config)
        return _done(output)

    def forward_backward(self, data: Sequence[Any], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict[str, Any] | None = None,
                         ) -> Future[ForwardBackwardOutput]:
        """Forward + backward with a built-in loss; gradients accumulate until ``optim_step``.

        ``loss_fn`` is one of Tinker's built-in losses (``cross_entropy``,
        ``importance_sampling``, ``ppo``, ``cispo``, ``dro``, ``gspo``; formulas and
        ``loss_fn_config`` keys in :mod:`training.sdk.losses`). Each is a sum over positions, not
        a mean: ``optim_step``'s ``grad_accumulation_normalization`` turns it into one.
        ``data`` holds this package's or ``tinker``'s ``Datum`` objects.
        """
        self._check_trainable("forward_backward")
        loss, output = self._builtin_loss(data, loss_fn, loss_fn_config)
        with collective("running the backward pass"):
            loss.backward()
        self._note_backward(len(output.loss_fn_outputs), int(output.metrics["num_loss_tokens"]))
        return _done(output)

    def forward_backward_custom(self, data: Sequence[Any], loss_fn: CustomLossFn, *,
                                output: str = "logprobs", pooling: str = "mean",
                                ) -> Future[ForwardBackwardOutput]:
        """Forward + backward with your loss on the per-token logprobs (or embeddings).

        ``loss_fn(datums, logprobs_list)`` gets one 1-D tensor per datum (with grad; see
        ``datum_from_model_input_weights`` for the alignment of weight-only datums) and returns
        ``(loss, metrics)``: a scalar tensor to differentiate and a dict of floats.

        With ``output="embedding"`` (seed 002) it gets instead one ``[hidden_size]`` fp32 tensor
        per datum: the model's final hidden states (after the last norm, before the output
        layer) pooled over the datum's tokens, ``pooling="mean"`` or ``"last"`` (the last
        token's, for causal models the one that has seen the whole sequence). The outputs then
        carry each datum's ``embedding``. Gradients accumulate until ``optim_step`` as for any
        loss; ``num_loss_tokens`` counts one per datum.
        """
        self._check_trainable("forward_backward_custom")
        if output not in ("logprobs", "embedding"):
            raise ValueError(f"output={output!r}: expected 'logprobs' or 'embedding'")
        pooling = Pooling.parse(pooling, "pooling")
        datums = [as_datum(d) for d in data]
        if output == "embedding":
            values, anchor = self._embeddings(datums, pooling)
            loss_tokens = len(datums)
        else:
            values, weights, anchor = self._logprobs(datums, require_targets=False)
            loss_tokens = sum(int((w != 0).sum()) if w is not None else lp.numel()
                              for lp, w in zip(values, weights, strict=True))
        result = loss_fn(datums, values)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError("custom loss_fn must return (loss_tensor, metrics_dict)")
        loss, metrics = result
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError("custom loss_fn must return a scalar torch.Tensor as its loss")
        # Under torchrun a rank's loss may depend only on other ranks' (detached) values: the
        # check is whether any rank's does.
        if not any(distributed.all_gather_object(loss.requires_grad)):
            raise ValueError(f"the custom loss does not depend on the {output} (no grad); "
                             f"build it from the tensors the loss function receives")
        if anchor is not None:
            loss = loss + anchor
        with collective("running the backward pass"):
            loss.backward()
        self._note_backward(len(datums), loss_tokens)
        output_key = "embedding" if output == "embedding" else "logprobs"
        return _done(ForwardBackwardOutput(
            loss_fn_output_type="custom",
            loss_fn_outputs=[{output_key: TensorData.from_torch(v.detach().float())}
                             for v in values],
            metrics={k: float(v) for k, v in (metrics or {}).items()},
        ))

    def _check_trainable(self, method: str) -> None:
        if self.frozen:
            raise TrainingUsageError(f"{method} on a frozen reference client: it serves forward() "
                               f"only; train with the policy client from "
                               f"create_training_client")

    def _note_backward(self, sequences: int, loss_tokens: int) -> None:
        self._pending_backward = True
        self._pending_loss_tokens += loss_tokens
        self._pending_sequences += sequences

    # ---------------------------------------------------------------- optimizer
    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _ensure_optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            # Hyper-parameters are overwritten from AdamParams at every optim_step. The fused
            # kernel is ~4x faster than foreach on CPU (28 vs 123 ms for 10M params).
            self._optimizer = torch.optim.AdamW(self._trainable(), lr=0.0, fused=True)
        return self._optimizer

    def optim_step(self, adam_params: AdamParams,
                   grad_accumulation_normalization: GradAccNormalization | str | None = None,
                   ) -> Future[OptimStepResponse]:
        """Apply one AdamW update with the gradients accumulated since the last step.

        ``grad_accumulation_normalization`` divides the accumulated gradient by the number of loss
        tokens or sequences first; ``None`` means ``NONE`` (raw sum, as in Tinker).

        Gradients with a NaN or infinite norm never reach the weights: the update is skipped
        (weights, optimizer moments and :attr:`step` stay as they were, the gradients are
        dropped) and the result says so with ``metrics["non_finite"] == 1.0`` (0.0 otherwise).

        Raises:
            ValueError: a non-finite or out-of-range Adam parameter.
        """
        self._check_trainable("optim_step")
        adam_params = as_adam_params(adam_params)
        _check_adam_params(adam_params)
        if not self._pending_backward:
            raise TrainingUsageError("optim_step called with no gradients: call forward_backward "
                                     "(or forward_backward_custom) first")
        mode = GradAccNormalization(grad_accumulation_normalization or GradAccNormalization.NONE)
        denominator = {GradAccNormalization.NUM_LOSS_TOKENS: self._pending_loss_tokens,
                       GradAccNormalization.NUM_SEQUENCES: self._pending_sequences,
                       GradAccNormalization.NONE: 1}[mode]
        denominator = max(denominator, 1)  # a batch with no loss token: nothing to scale
        grads = [p.grad for p in self._trainable() if p.grad is not None]
        # Normalization and clipping fold into one in-place multiply: on CPU,
        # clip_grad_norm_ plus a separate division cost several times the norm itself.
        grad_norm = 0.0
        if grads:
            total = torch.nn.utils.get_total_norm(grads)
            if hasattr(total, "full_tensor"):  # FSDP: a DTensor of per-rank partial norms
                with collective("reducing the gradient norm"):
                    total = total.full_tensor()
            grad_norm = float(total) / denominator
        if not math.isfinite(grad_norm):
            # One NaN/inf gradient would make every weight and Adam moment NaN for good.
            self.model.zero_grad(set_to_none=True)
            self._pending_backward = False
            self._pending_loss_tokens = self._pending_sequences = 0
            logger.warning("job %s: the gradient norm is %s; the update was skipped (weights "
                           "unchanged at step %d)", self.job_id, grad_norm, self._step)
            return _done(OptimStepResponse(metrics={
                "grad_norm": grad_norm, "learning_rate": adam_params.learning_rate,
                "step": float(self._step), "normalized_by": float(denominator),
                "non_finite": 1.0}))
        scale = 1.0 / denominator
        if 0 < adam_params.grad_clip_norm < grad_norm:
            scale *= adam_params.grad_clip_norm / (grad_norm + 1e-6)
        if grads and scale != 1.0:
            torch._foreach_mul_(grads, scale)
        optimizer = self._ensure_optimizer()
        for group in optimizer.param_groups:
            group["lr"] = adam_params.learning_rate
            group["betas"] = (adam_params.beta1, adam_params.beta2)
            group["eps"] = adam_params.eps
            group["weight_decay"] = adam_params.weight_decay
        self._wait_for_staging()
        with collective("applying the optimizer step"):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._step += 1
        self._pending_backward = False
        self._pending_loss_tokens = self._pending_sequences = 0
        return _done(OptimStepResponse(metrics={
            "grad_norm": grad_norm, "learning_rate": adam_params.learning_rate,
            "step": float(self._step), "normalized_by": float(denominator),
            "non_finite": 0.0}))

    # ---------------------------------------------------------------- train state (DCP)
    def save_state(self, name: str, ttl_seconds: int | None = None, timeout: float | None = None,
                   user_state: dict[str, Any] | None = None, *,
                   user_metadata: dict[str, str] | None = None,
                   overwrite: bool | None = None) -> Future[SaveStateResponse]:
        """Save weights + optimizer (+ ``user_state``) as a DCP checkpoint named ``name``.

        ``user_metadata`` (Tinker's) is a dict of strings kept with the checkpoint
        (``create_rest_client().list_checkpoints`` shows it). ``overwrite=False`` refuses a name
        that already has a committed train state; the default (``None``) replaces it, as
        ``True`` does (a recipe re-saves the step it resumed at).

        ``user_state`` (a local extension) is any picklable dict stored inside the same DCP
        checkpoint, e.g. step, data position, RNG states; ``load_state*`` returns it (each rank
        gets its own under torchrun). Gradients accumulated since the last ``optim_step`` are not
        saved. ``timeout`` is accepted for API compatibility.

        With :attr:`async_saves` the call returns at once: a background thread copies the state
        aside (while the next forward/backward, which only reads the weights, runs; the next
        ``optim_step`` waits for that copy) and then writes the files; the future
        completes when the checkpoint is committed (its ``meta.json`` written), and carries the
        error if the write failed. Until then the checkpoint does not exist for any reader. At
        most one save is in flight: the next save, a load, or :meth:`wait_for_saves` waits.
        """
        validate_name(name)
        if user_metadata is not None and not (isinstance(user_metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in user_metadata.items())):
            raise TypeError(f"user_metadata must be a dict of strings to strings, got "
                            f"{user_metadata!r}")
        called = time.perf_counter()
        self.wait_for_saves()
        if overwrite is False and self._has_state(name):
            raise StoreError(f"train state {name!r} of job {self.job_id} already exists; pass "
                             f"overwrite=True to replace it, or choose another name")
        state: dict[str, Any] = {
            **self._live_state_dicts(),
            "trainer": {"step": self._step},
            user_state_key(self.world.rank): pickle.dumps(user_state or {}),
        }
        entry_dir = self.store.state_dir(self.job_id, name)
        now = time.time()
        meta = EntryMeta(kind="state", name=name, job_id=self.job_id, base_model=self.base_model,
                         created_at=now, expires_at=now + ttl_seconds if ttl_seconds else None,
                         extra={"step": self._step, "has_optimizer": self._optimizer is not None,
                                "world_size": self.world.world_size,
                                **({"user_metadata": dict(user_metadata)}
                                   if user_metadata else {})})
        response = SaveStateResponse(path=make_cross_job_ref(self.job_id, name), name=name,
                                     job_id=self.job_id)
        what = f"saving train state {name!r}"
        # Every rank writes its shards into the one entry: rank 0 clears a stale leftover first.
        try:
            distributed.on_main(lambda: self.store.clear_entry(entry_dir))
            local = self.store.open_entry(entry_dir)
        except OSError as e:  # the store's directories cannot be made (full, read-only)
            raise StoreError(f"{what} failed in {self.store.url(entry_dir)}: "
                             f"{type(e).__name__}: {e}") from e
        # Ranks of a remote store each upload their own files; only a barrier tells rank 0 that
        # all uploads are done, so those saves stay synchronous.
        if not self.async_saves or (self.world.distributed and not self.store.is_local):
            try:
                dcp_call(dcp.save, state, local, what)
                write_state_checksums(local, self.world.rank)
                self.store.close_entry(entry_dir, local)
            except BaseException:
                self.store.abort_entry(entry_dir, local)
                raise
            distributed.barrier()
            distributed.on_main(lambda: self.store.commit(entry_dir, meta))
            return _done(response)

        future: Future[SaveStateResponse] = Future()
        staged = threading.Event()
        process_group = distributed.checkpoint_group()  # created here: a collective itself

        def write_in_background() -> None:
            try:
                # The copy runs while the caller's next forward/backward only reads the weights;
                # optim_step (the first thing that changes them) waits for it.
                try:
                    copy = self._staging.copy(state)
                finally:
                    staged.set()
                dcp_call(dcp.save, copy, local, what, process_group)
                write_state_checksums(local, self.world.rank)
                self.store.close_entry(entry_dir, local)
                if self.world.is_main:  # rank 0's save ends after every rank's shards
                    self.store.commit(entry_dir, meta)
                future.set_result(response)
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits on the future)
                self.store.abort_entry(entry_dir, local)
                future.set_exception(e if isinstance(e, StoreError) else StoreError(
                    f"{what} failed in {self.store.url(entry_dir)}: {type(e).__name__}: {e}"))

        self._staged = staged
        threading.Thread(target=write_in_background, name=f"homefire-save-{name}").start()
        self._pending_saves.append(future)
        self.save_stall_s += time.perf_counter() - called
        return future

    def _has_state(self, name: str) -> bool:
        try:
            self.store.get_state(self.job_id, name)
        except StoreError:
            return False
        return True

    def _wait_for_staging(self) -> None:
        """Block until a background save has copied the state aside (before weights change)."""
        if self._staged is not None:
            waited = time.perf_counter()
            self._staged.wait()
            self.save_stall_s += time.perf_counter() - waited
            self._staged = None

    def _live_state_dicts(self) -> dict[str, Any]:
        """The model (and optimizer) state dicts of a train state: views of the live tensors.

        Building them maps every parameter to its name (~12 ms for 10M params). The tensors
        they hold are the live parameters and optimizer moments, which stay the same objects
        from step to step, so the dicts are built once per optimizer (and once its moments
        exist) and reused; only the optimizer's hyper-parameters, plain numbers copied into
        ``param_groups``, are refreshed each time.
        """
        optimizer = self._optimizer
        key = (id(optimizer), len(optimizer.state) if optimizer is not None else 0)
        if self._state_dicts_key != key:
            dicts: dict[str, Any] = {"model": train_state_dict(self.model,
                                                                lora=self.job.lora_rank > 0)}
            if optimizer is not None:
                dicts["optim"] = get_optimizer_state_dict(self.model, optimizer)
            self._state_dicts, self._state_dicts_key = dicts, key
        if optimizer is not None:
            for saved, live in zip(self._state_dicts["optim"]["param_groups"],
                                   optimizer.param_groups, strict=True):
                saved.update({k: v for k, v in live.items() if k != "params"})
        return dict(self._state_dicts)

    def wait_for_saves(self) -> None:
        """Block until every background save has committed; raise the first one's error."""
        pending, self._pending_saves = self._pending_saves, []
        errors = []
        for future in pending:
            try:
                future.result()
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)
        if errors:
            raise errors[0]

    @property
    def saves_in_flight(self) -> int:
        """Background saves not yet committed (0 or 1)."""
        return sum(not f.done() for f in self._pending_saves)

    def load_state(self, path: str) -> Future[LoadStateResponse]:
        """Load weights from a train state; the optimizer is reset (fresh moments, step 0)."""
        return _done(self._load_state(path, with_optimizer=False))

    def load_state_with_optimizer(self, path: str) -> Future[LoadStateResponse]:
        """Load weights, optimizer moments and the optimizer step count from a train state."""
        return _done(self._load_state(path, with_optimizer=True))

    def _load_state(self, path: str, with_optimizer: bool) -> LoadStateResponse:
        self.wait_for_saves()
        job_id, name = parse_checkpoint_ref(path, default_job_id=self.job_id)
        meta = self.store.get_state(job_id, name)
        if meta.base_model != self.base_model:
            raise ValueError(f"train state {job_id}:{name} was trained from base_model "
                             f"{meta.base_model!r}, but this client trains {self.base_model!r}; "
                             f"create the client with the checkpoint's base model")
        self._optimizer = None
        self.model.zero_grad(set_to_none=True)
        self._pending_backward = False
        self._pending_loss_tokens = self._pending_sequences = 0
        lora = self.job.lora_rank > 0
        if not lora:  # full weights are written below: never into a base other clients share
            own_weights(self.model)
            self._state_dicts_key = None
        # A rank the saving run did not have (it ran with fewer processes) gets rank 0's
        # user state: the data position is the same on every rank.
        saved_world = int(meta.extra.get("world_size", 1))
        user_key = user_state_key(self.world.rank if self.world.rank < saved_world else 0)
        state: dict[str, Any] = {"model": train_state_dict(self.model, lora),
                                 "trainer": {"step": 0}, user_key: b""}
        restore_optimizer = with_optimizer and meta.extra.get("has_optimizer", False)
        if restore_optimizer:
            state["optim"] = get_optimizer_state_dict(self.model, self._ensure_optimizer())
        with self.store.local_copy(self.store.state_dir(job_id, name)) as local:
            verify_state_checksums(local, f"train state {job_id}:{name}")
            dcp_call(dcp.load, state, local, f"loading train state {job_id}:{name}")
        # A LoRA state holds exactly the adapter (DCP refuses a checkpoint that lacks any of it),
        # so non-strict only skips the frozen base weights.
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=not lora))
        if restore_optimizer:
            set_optimizer_state_dict(self.model, self._optimizer, state["optim"])
        self._step = int(state["trainer"]["step"]) if with_optimizer else 0
        return LoadStateResponse(path=make_cross_job_ref(job_id, name),
                                 user_state=pickle.loads(state[user_key]))

    def list_checkpoints(self) -> list[str]:
        """Names of this job's train states (DCP checkpoints), oldest first."""
        return [m.name for m in self.store.list_states(self.job_id)]

    def resolve_checkpoint_path(self, checkpoint_name: str, source_job_id: str) -> str:
        """A ``cross_job://<job>/<name>`` reference to another job's train state (checked)."""
        self.store.get_state(source_job_id, checkpoint_name)
        return make_cross_job_ref(source_job_id, checkpoint_name)

    def load_adapter(self, adapter_path: str) -> Future[None]:
        """Load a PEFT adapter directory's weights into this LoRA session (weights only: the
        optimizer, schedule and data cursor are untouched)."""
        if self.job.lora_rank <= 0:
            raise ValueError(f"load_adapter needs a LoRA session (lora_rank > 0); job "
                             f"{self.job_id} trains all weights")
        self._check_trainable("load_adapter")
        self.wait_for_saves()  # a background save may still be copying these weights
        load_adapter_weights(self.model, adapter_path)
        return _done(None)

    # ---------------------------------------------------------------- sampler weights
    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 checkpoint_type: str | None = None,
                                 ) -> Future[SaveSamplerResult]:
        """Save the current weights for inference (HF format) as ``<name>-<session id>``."""
        return _done(self.save_weights_for_sampler_ext(name, checkpoint_type=checkpoint_type,
                                                       ttl_seconds=ttl_seconds))

    def save_weights_for_sampler_ext(self, name: str, checkpoint_type: str | None = None,
                                     ttl_seconds: int | None = None) -> SaveSamplerResult:
        """Like ``save_weights_for_sampler`` but returns the :class:`SaveSamplerResult` directly.

        ``checkpoint_type``:

        * ``"base"``: a Hugging Face directory (safetensors + config + tokenizer) that
          ``AutoModelForCausalLM.from_pretrained`` loads, typed ``INFERENCE_BASE``; promotable.
        * ``"delta"``: these weights' exact difference from the previous snapshot of this
          session's chain, per tensor ``new XOR reference`` (or the elements' moves in ulps with
          ``delta_encoding="ulp"``), zstd-compressed
          (``INFERENCE_ARC_V2``, see :mod:`training.sdk.snapshots`); ~10x smaller than a bf16
          base at small learning rates; not promotable.
        * ``None`` (default): ``"base"`` for the first snapshot of the session (or after
          :meth:`reset_sampler_chain`), ``"delta"`` after that.

        Weights are stored in :attr:`sampler_dtype`. ``ttl_seconds`` expires the snapshot (a
        delta whose chain lost a snapshot can still be hot-loaded onto a deployment that holds
        its reference, but no longer rebuilt from the store).

        Raises:
            ValueError: an unknown ``checkpoint_type``, or ``"delta"`` with no base saved yet in
                this session.
            StoreError: the snapshot could not be written.
        """
        if checkpoint_type is not None:
            checkpoint_type = SnapshotType.parse(checkpoint_type, "checkpoint_type")
        if self.job.lora_rank > 0:
            checkpoint_type = "base"  # adapters are small and standalone: no delta chain
        chain = self._sampler_chain
        resolved = checkpoint_type or ("delta" if chain is not None else "base")
        if resolved == "delta" and chain is None:
            raise ValueError(f"cannot save sampler snapshot {name!r} as a delta: job "
                             f"{self.job_id} has no base snapshot in this session to build the "
                             f"chain on; save one with checkpoint_type='base' first")
        snapshot_name = f"{validate_name(name)}-{self.session_id}"
        identity = make_snapshot_identity(self.job_id, snapshot_name)
        entry_dir = self.store.sampler_dir(self.job_id, snapshot_name)
        lora = self.job.lora_rank > 0
        # An adapter is saved as itself; only full-parameter snapshots need a weights copy.
        # Under torchrun the full weights are gathered to rank 0, which alone writes them.
        weights = self._adapter_weights() if lora else self._sampler_weights()
        if weights or not self.world.distributed:  # rank 0 checks what it will write
            check_finite_weights(weights or {n: p.detach() for n, p in
                                             self.model.named_parameters() if p.requires_grad},
                                 f"sampler snapshot {snapshot_name!r} of job {self.job_id}")
        extra: dict[str, Any] = {"step": self._step,
                                 "dtype": str(self.sampler_dtype).removeprefix("torch.")}

        def write() -> None:
            try:
                with self.store.staging_dir(entry_dir) as local, progress_bars_disabled():
                    if lora:
                        save_adapter(self.model, local, weights or None)
                        self.tokenizer.save_pretrained(local)
                    elif resolved == "base":
                        write_base_snapshot(local, self.model, self.tokenizer, weights)
                    else:
                        stats = encode_delta(
                            weights, chain.weights, local, reference_identity=chain.identity,
                            encodings=DELTA_ENCODINGS[self.delta_encoding])
                        extra.update(reference=chain.identity,
                                     delta_bytes=stats.compressed_bytes,
                                     raw_bytes=stats.raw_bytes)
            except (OSError, SafetensorError) as e:
                # safetensors reports a full disk as its own error type, not an OSError.
                raise StoreError(f"saving sampler snapshot {snapshot_name!r} of job "
                                 f"{self.job_id} failed in {self.store.url(entry_dir)}: "
                                 f"{e}; nothing was saved. Free disk space or make the store "
                                 f"writable, then save again") from e
            now = time.time()
            self.store.commit(entry_dir, EntryMeta(
                kind="sampler", name=snapshot_name, job_id=self.job_id,
                base_model=self.base_model, created_at=now,
                expires_at=now + ttl_seconds if ttl_seconds else None,
                snapshot_type=self.store.infer_snapshot_type(entry_dir), extra=extra))

        distributed.on_main(write)
        if not lora:
            # Only a committed snapshot may become the reference of the next delta.
            self._sampler_chain = _SamplerChainHead(identity=identity, weights=weights)
        return SaveSamplerResult(path=identity, snapshot_name=snapshot_name)

    def _sampler_weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights in :attr:`sampler_dtype` (rank 0's are the full weights
        gathered from every rank; other ranks get an empty dict)."""
        if not self.world.distributed:
            return sampler_weights(self.model, self.sampler_dtype)
        with collective("gathering the weights for a sampler snapshot"):
            full = get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        if not self.world.is_main:
            return {}
        # Keep tied tensors once, under their first name, as the single-process path does.
        names = {name for name, _ in self.model.named_parameters()}
        names |= {name for name, _ in self.model.named_buffers()}
        return {k: (v.to(self.sampler_dtype) if v.is_floating_point() else v).contiguous()
                for k, v in full.items() if k in names}

    def _adapter_weights(self) -> dict[str, torch.Tensor]:
        """Under torchrun, the full trainable (adapter) weights gathered from every rank onto
        rank 0's CPU (other ranks get an empty dict); for one process, an empty dict: the
        adapter is saved straight from the model."""
        if not self.world.distributed:
            return {}
        with collective("gathering the adapter weights for a sampler snapshot"):
            full = get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        return full if self.world.is_main else {}

    @property
    def sampler_chain_head(self) -> str | None:
        """Identity of the snapshot the next delta will reference (None: the next is a base)."""
        return self._sampler_chain.identity if self._sampler_chain is not None else None

    def reset_sampler_chain(self) -> None:
        """Make the next default ``save_weights_for_sampler[_ext]`` a base snapshot."""
        self._sampler_chain = None


@dataclass
class _SamplerChainHead:
    """The last sampler snapshot of the session: the reference of the next delta."""

    identity: str
    weights: dict[str, torch.Tensor]
    """Its tensors exactly as stored (CPU, sampler dtype): one model's worth of memory."""


