"""The training client: a trainer job running on local torch compute, with Tinker's method set.

Calls execute in the caller's thread, in call order, and return already-completed futures so code
written for the hosted API (``client.forward_backward(...).result()``) runs unchanged. Errors are
raised at the call, never parked in a future that nobody reads.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from training.sdk import distributed
from training.sdk.distributed import collective
from training.sdk.forward_passes import ForwardPasses
from training.sdk.futures import AwaitableSelf, async_twins, completed
from training.sdk.lora import load_adapter_weights
from training.sdk.loss_scaling import DynamicLossScale
from training.sdk.packed_attention import supports_packed_attention
from training.sdk.packing import MAX_LOGITS, pack_sequences, token_logprobs  # noqa: F401
from training.sdk.sampler_saves import (
    NonFiniteWeightsError,  # noqa: F401 (importable from here as before the split)
    SamplerSaves,
    _SamplerChainHead,
    check_finite_weights,  # noqa: F401
)
from training.sdk.snapshots import (
    DEFAULT_DELTA_ENCODING,
    DELTA_ENCODINGS,
)
from training.sdk.store import (
    CheckpointStore,
    JobRecord,
)
from training.sdk.train_state import (
    StagingBuffers,
    StateCorruptError,  # noqa: F401 (importable from here as before the split)
)
from training.sdk.train_state_saves import TrainStateSaves
from training.sdk.types import (
    AdamParams,
    CustomOutput,
    Datum,
    ForwardBackwardOutput,
    GradAccNormalization,
    MixedPrecision,
    OptimStepResponse,
    Pooling,
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


class TrainingUsageError(RuntimeError):
    """A call the training client's state does not allow (``optim_step`` before any backward,
    training a frozen reference client); the message says what to call instead."""


_done = completed


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_autocast_dtype(mixed_precision: MixedPrecision | str,
                           device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it natively (``"auto"``), always, fp16, or never."""
    mixed_precision = MixedPrecision.parse(mixed_precision, "mixed_precision")
    if mixed_precision == MixedPrecision.no:
        return None
    if mixed_precision == MixedPrecision.bf16:
        return torch.bfloat16
    if mixed_precision == MixedPrecision.fp16:
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # Without native bf16 (AVX-512 BF16 / AMX) the CPU emulates it and autocast is slower.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


@async_twins("forward", "forward_backward", "forward_backward_custom", "optim_step",
             "save_state", "load_state", "load_state_with_optimizer", "save_weights_for_sampler",
             "load_adapter", "get_info", "create_sampling_client",
             "save_weights_and_get_sampling_client")
class TrainingClient(ForwardPasses, TrainStateSaves, SamplerSaves, AwaitableSelf):
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
        self.loss_scale = (DynamicLossScale() if autocast_dtype == torch.float16 and not frozen
                           else None)
        """fp16's dynamic loss scale (None in bf16 or fp32): saved and restored with the
        optimizer."""
        self._step = 0
        self._pending_loss_tokens = 0
        self._pending_sequences = 0
        self._pending_backward = False
        self.async_saves = async_saves
        """``save_state`` writes in the background (see :meth:`save_state`)."""
        # The compiled module shares the model's parameters: state dicts, checkpoints and
        # snapshots keep using self.model.
        # Compiled, the whole-batch path (inductor fuses the upcast and log-softmax into the
        # output layer; a loop over chunks would recompile as packed shapes vary).
        score = functools.partial(token_logprobs, model, max_logits=None if compile
                                  else MAX_LOGITS)
        # Compiling the loss with the model lets inductor fuse the fp32 upcast, log-softmax and
        # gather of the logits into the lm_head's epilogue (and the same in backward).
        self._eager_token_logprobs = score
        self._token_logprobs = torch.compile(score, dynamic=True) if compile else score
        # Attention per document where the model allows it (no dense mask, no padding but
        # rounding); otherwise rows with block-diagonal masks.
        # (Not under gradient checkpointing: backward recomputes the blocks outside the packed
        # forward's context, with the model's own attention.)
        self._per_document_attention = supports_packed_attention(
            model, device, autocast_dtype) and not any(
            getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
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
        self._backward(loss)
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
        output = CustomOutput.parse(output, "output")
        pooling = Pooling.parse(pooling, "pooling")
        datums = [as_datum(d) for d in data]
        if output == CustomOutput.embedding:
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
        self._backward(loss)
        self._note_backward(len(datums), loss_tokens)
        output_key = output.value
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

    def _backward(self, loss: torch.Tensor) -> None:
        if self.loss_scale is not None:  # fp16: keep small gradients above underflow
            loss = loss * self.loss_scale.scale
        with collective("running the backward pass"):
            loss.backward()

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
        Under fp16 mixed precision such a gradient is first taken for an overflow of the loss
        scale: the update is skipped the same way, the scale halved, and the result has
        ``metrics["overflow"] == 1.0`` with ``non_finite`` 0.0 (``loss_scale`` is always there);
        only at the smallest scale is it reported non-finite.

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
        loss_scale = self.loss_scale.scale if self.loss_scale is not None else 1.0
        grad_norm /= loss_scale

        def result(non_finite: bool, **fp16: float) -> Future[OptimStepResponse]:
            if self.loss_scale is not None:
                fp16 = {"loss_scale": loss_scale, **fp16}
            return _done(OptimStepResponse(metrics={
                "grad_norm": grad_norm, "learning_rate": adam_params.learning_rate,
                "step": float(self._step), "normalized_by": float(denominator),
                "non_finite": float(non_finite), **fp16}))

        if not math.isfinite(grad_norm):
            # One NaN/inf gradient would make every weight and Adam moment NaN for good.
            self.model.zero_grad(set_to_none=True)
            self._pending_backward = False
            self._pending_loss_tokens = self._pending_sequences = 0
            if self.loss_scale is not None and self.loss_scale.overflowed():
                logger.info("job %s: fp16 gradient overflow at loss scale %g; update skipped, "
                            "scale now %g", self.job_id, loss_scale, self.loss_scale.scale)
                return result(False, overflow=1.0, loss_scale=self.loss_scale.scale)
            logger.warning("job %s: the gradient norm is %s; the update was skipped (weights "
                           "unchanged at step %d)", self.job_id, grad_norm, self._step)
            return result(True)
        scale = 1.0 / (denominator * loss_scale)
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
        if self.loss_scale is None:
            return result(False)
        self.loss_scale.stepped()
        return result(False, overflow=0.0)

    # ---------------------------------------------------------------- train state (DCP)

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


