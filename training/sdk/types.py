"""Wire types of the training API, with the Tinker / Fireworks names and fields.

These are plain dataclasses owned by this project, so a script written against the hosted SDK
ports by changing its imports. The official ``tinker`` package's types (``tinker.Datum``,
``ModelInput``, ``TensorData``, ``AdamParams``, ``SamplingParams``) are accepted wherever these are:
the ``as_*`` functions below convert them (by their fields, without importing ``tinker``), so
``import tinker; client.optim_step(tinker.AdamParams(...))`` works as the seeds write it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from training.sdk.choices import Choice

LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"]
"""Names of the built-in losses accepted by ``forward`` / ``forward_backward`` (Tinker's; see
:mod:`training.sdk.losses`)."""

LOSS_FN_INPUT_DTYPES = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
    "routing_matrices": "int64",
}
"""The dtype each known ``loss_fn_inputs`` key is coerced to (as ``tinker.Datum`` does): plain
lists, numpy arrays and tensors of other dtypes are converted. Other keys (read by your own
``forward_backward_custom`` loss) keep integer data as int64 and floats as float32."""

_TORCH_DTYPES = {"int64": torch.int64, "float32": torch.float32, "int32": torch.int32,
                 "float64": torch.float64, "uint8": torch.uint8, "int8": torch.int8,
                 "int16": torch.int16,
                 "float16": torch.float16, "bfloat16": torch.bfloat16, "bool": torch.bool}


@dataclass
class EncodedTextChunk:
    """A run of token ids inside a :class:`ModelInput`."""

    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class ModelInput:
    """The token sequence fed to the model, as a list of chunks (only text chunks locally)."""

    chunks: list[EncodedTextChunk] = field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]

    def append_int(self, token: int) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, EncodedTextChunk(tokens=[int(token)])])

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)


@dataclass
class TensorData:
    """A flat list of numbers plus dtype and shape: the wire form of a tensor."""

    data: list[int] | list[float]
    dtype: str
    shape: list[int] | None = None

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        tensor = tensor.detach().cpu()
        dtype = str(tensor.dtype).removeprefix("torch.")
        return cls(data=tensor.reshape(-1).tolist(), dtype=dtype, shape=list(tensor.shape))

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        return cls.from_torch(torch.from_numpy(np.ascontiguousarray(array)))

    def to_torch(self) -> torch.Tensor:
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"TensorData dtype {self.dtype!r} is not one of {sorted(_TORCH_DTYPES)}")
        tensor = torch.tensor(self.data, dtype=_TORCH_DTYPES[self.dtype])
        return tensor.reshape(self.shape) if self.shape is not None else tensor

    def to_numpy(self) -> np.ndarray:
        return self.to_torch().numpy()

    def tolist(self) -> list:
        return self.to_torch().tolist()


def as_tensor_data(key: str, value: Any) -> TensorData:
    """``value`` of ``loss_fn_inputs[key]`` as a :class:`TensorData` of the key's dtype
    (:data:`LOSS_FN_INPUT_DTYPES`).

    Accepts this module's or ``tinker``'s ``TensorData``, torch tensors, numpy arrays and
    (nested, rectangular) lists or tuples of numbers.

    Raises:
        TypeError: a value of another type (strings, dicts, ...).
        ValueError: ragged nested lists, or non-numeric elements.
    """
    if isinstance(value, TensorData):
        if _target_dtype(key, value.dtype) == value.dtype:
            return value
        tensor = value.to_torch()
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
    elif isinstance(value, np.ndarray) or _is_tinker_tensor_data(value):
        array = value if isinstance(value, np.ndarray) else value.to_numpy()
        if array.dtype.kind not in "biuf":
            raise TypeError(f"loss_fn_inputs[{key!r}] must hold numbers, got a numpy array of "
                            f"dtype {array.dtype}")
        array = np.ascontiguousarray(array)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    elif isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError as e:
            raise ValueError(f"loss_fn_inputs[{key!r}] must be a rectangular array of numbers; "
                             f"ragged nested lists are not supported") from e
        if array.dtype.kind not in "biuf":
            raise ValueError(f"loss_fn_inputs[{key!r}] must hold numbers (a rectangular list of "
                             f"ints or floats), got elements of dtype {array.dtype}")
        tensor = torch.from_numpy(array)
    else:
        raise TypeError(f"loss_fn_inputs[{key!r}] must be TensorData, a torch.Tensor, a numpy "
                        f"array or a list of numbers, got {type(value).__name__}")
    dtype = _target_dtype(key, str(tensor.dtype).removeprefix("torch."))
    return TensorData.from_torch(tensor.to(_TORCH_DTYPES[dtype]))


def _target_dtype(key: str, dtype: str) -> str:
    if key in LOSS_FN_INPUT_DTYPES:
        return LOSS_FN_INPUT_DTYPES[key]
    if dtype in ("int64", "int32", "float32", "bool"):
        return dtype
    return "float32" if dtype.startswith(("float", "bfloat")) else "int64"


def _is_tinker_tensor_data(value: Any) -> bool:
    """A ``tinker.TensorData`` (or anything with its shape: a dtype and ``to_numpy``)."""
    return hasattr(value, "dtype") and callable(getattr(value, "to_numpy", None))


def as_model_input(value: Any) -> ModelInput:
    """This module's :class:`ModelInput` from ours, ``tinker``'s, or a list of token ids.

    Raises:
        TypeError: something else, or a chunk that is not text (images are not supported).
    """
    if isinstance(value, ModelInput):
        return value
    if isinstance(value, (list, tuple)):
        return ModelInput.from_ints(value)
    chunks = getattr(value, "chunks", None)
    if chunks is None:
        raise TypeError(f"model_input must be a ModelInput (homefire's or tinker's) or a list "
                        f"of token ids, got {type(value).__name__}")
    ours = []
    for i, chunk in enumerate(chunks):
        tokens = getattr(chunk, "tokens", None)
        if tokens is None:
            raise TypeError(f"model_input chunk {i} is a {type(chunk).__name__}: only text "
                            f"chunks (EncodedTextChunk) are supported locally")
        ours.append(EncodedTextChunk(tokens=[int(t) for t in tokens]))
    return ModelInput(chunks=ours)


def as_datum(value: Any) -> Datum:
    """This module's :class:`Datum` from ours or ``tinker``'s (``model_input`` +
    ``loss_fn_inputs``)."""
    if isinstance(value, Datum):
        return value
    if not (hasattr(value, "model_input") and hasattr(value, "loss_fn_inputs")):
        raise TypeError(f"expected a Datum (homefire's or tinker's), got "
                        f"{type(value).__name__}")
    return Datum(model_input=value.model_input, loss_fn_inputs=dict(value.loss_fn_inputs))


@dataclass
class Datum:
    """One training example: the model input plus per-position loss inputs.

    For the built-in ``cross_entropy`` loss, ``loss_fn_inputs`` holds ``target_tokens`` (the token
    to predict at each input position) and optionally ``weights`` (per-position loss weight, 0 to
    skip a position; defaults to 1 everywhere). Both have the length of ``model_input``.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model_input = as_model_input(self.model_input)
        self.loss_fn_inputs = {k: as_tensor_data(k, v) for k, v in self.loss_fn_inputs.items()}


def datum_from_model_input_weights(model_input: ModelInput, weights: Sequence[float]) -> Datum:
    """A weight-based datum for ``forward_backward_custom``: no ``target_tokens``.

    ``weights`` has one entry per token of ``model_input``. The logprob handed to the custom loss at
    position ``i`` is ``log p(token_i | tokens_<i)``; position 0 has no prediction and gets 0.
    Built-in losses refuse such datums (they need ``target_tokens``).
    """
    if len(weights) != model_input.length:
        raise ValueError(f"weights has {len(weights)} entries but model_input has "
                         f"{model_input.length} tokens")
    return Datum(model_input=model_input,
                 loss_fn_inputs={"weights": TensorData(data=[float(w) for w in weights],
                                                       dtype="float32", shape=[len(weights)])})


@dataclass
class AdamParams:
    """Hyper-parameters of one AdamW update (``optim_step``)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value before the update; 0 disables clipping."""


def as_adam_params(value: Any) -> AdamParams:
    """This module's :class:`AdamParams` from ours or ``tinker.AdamParams`` (same fields)."""
    if isinstance(value, AdamParams):
        return value
    names = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
    if not hasattr(value, "learning_rate"):
        raise TypeError(f"adam_params must be an AdamParams (homefire's or tinker's), got "
                        f"{type(value).__name__}")
    return AdamParams(**{n: float(getattr(value, n)) for n in names if hasattr(value, n)})


class GradAccNormalization(Choice):
    """How ``optim_step`` normalizes gradients accumulated over ``forward_backward`` calls.

    The hosted SDK's upper-case names (``GradAccNormalization.NUM_LOSS_TOKENS``) are aliases
    of the lower-case members that the command line parses."""

    num_loss_tokens = "num_loss_tokens"
    """Divide by the number of positions with non-zero weight since the last step."""
    num_sequences = "num_sequences"
    """Divide by the number of datums since the last step."""
    none = "none"
    """Raw gradient sum (the built-in losses are sums over positions)."""
    NUM_LOSS_TOKENS = "num_loss_tokens"
    NUM_SEQUENCES = "num_sequences"
    NONE = "none"


class MixedPrecision(Choice):
    """The compute dtype of forward and backward (``mixed_precision``); master weights and
    optimizer state stay fp32 either way."""

    auto = "auto"
    """bf16 autocast where the hardware runs it natively (CUDA with bf16, CPUs with AVX-512
    BF16 / AMX), else fp32."""
    bf16 = "bf16"
    """bf16 autocast always."""
    fp16 = "fp16"
    """fp16 autocast with dynamic loss scaling, for GPUs without bf16 (V100, T4): an update
    whose gradient overflows is skipped and the scale halved (``overflow`` and ``loss_scale``
    in the step's metrics)."""
    no = "no"
    """fp32 throughout (also spelled ``fp32`` or ``none``)."""

    @classmethod
    def _missing_(cls, value: object) -> MixedPrecision | None:
        return cls.no if value in ("fp32", "none") else None


class CustomOutput(Choice):
    """What ``forward_backward_custom`` hands the custom loss, per datum."""

    logprobs = "logprobs"
    """The per-token logprobs of the datum's targets (1-D, with grad)."""
    embedding = "embedding"
    """The final hidden states pooled into one ``[hidden_size]`` vector (``pooling``)."""


class Pooling(Choice):
    """How ``forward_backward_custom(output="embedding")`` pools a datum's final hidden
    states into one embedding."""

    mean = "mean"
    """The average over the datum's tokens."""
    last = "last"
    """The last token's (for causal models the one that has seen the whole sequence)."""


@dataclass
class ForwardBackwardOutput:
    """Result of ``forward`` / ``forward_backward`` / ``forward_backward_custom``.

    ``loss_fn_outputs`` has one dict per datum (``logprobs``: log-probability of each target
    token, float32, one per input position). ``metrics`` holds ``loss:sum`` (sum of
    weight * -logprob over the batch), ``num_loss_tokens`` and ``num_sequences`` for built-in
    losses; whatever the loss function returned for custom ones.
    """

    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


@dataclass
class OptimStepResponse:
    """Result of ``optim_step``: ``grad_norm`` (before clipping), ``learning_rate``, ``step``."""

    metrics: dict[str, float]


@dataclass
class SaveStateResponse:
    """Result of ``save_state``: ``path`` is the ``cross_job://<job>/<name>`` reference."""

    path: str
    name: str
    job_id: str


@dataclass
class LoadStateResponse:
    """Result of ``load_state`` / ``load_state_with_optimizer``.

    ``user_state`` is whatever the saver passed as ``user_state`` to ``save_state`` (the recipes
    keep step, data position, RNG states and schedule there); empty if none.
    """

    path: str
    user_state: dict[str, Any] = field(default_factory=dict)


@dataclass
class SaveSamplerResult:
    """Result of ``save_weights_for_sampler[_ext]``.

    ``snapshot_name`` is session-qualified (``<name>-<8 hex>``); ``path`` is the public snapshot
    identity to hand to ``create_sampling_client(model_path=...)`` or to promotion.
    """

    path: str
    snapshot_name: str


# Tinker's name for the future's payload of save_weights_for_sampler.
SaveWeightsForSamplerResponse = SaveSamplerResult


@dataclass
class SamplingParams:
    """How to sample completions (Tinker's fields).

    ``stop`` is a string, a list of strings, or a list of token ids; generation also stops at
    the tokenizer's end-of-sequence token. ``temperature=0`` is greedy decoding. The same
    ``seed`` with the same request gives the same completions.
    """

    max_tokens: int = 64
    """Most new tokens per completion."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """Keep the ``top_k`` most likely tokens; -1 (or 0) disables the cut."""
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")

    def stop_token_ids(self) -> list[int]:
        return [int(s) for s in self._stops() if not isinstance(s, str)]

    def stop_strings(self) -> list[str]:
        return [s for s in self._stops() if isinstance(s, str)]

    def _stops(self) -> list[str | int]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def as_sampling_params(value: Any) -> SamplingParams:
    """This module's :class:`SamplingParams` from ours, ``tinker.SamplingParams`` (its
    ``max_tokens=None`` takes our default) or a dict of the same fields."""
    if isinstance(value, SamplingParams):
        return value
    fields = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise TypeError(f"unknown SamplingParams field(s) {unknown}; known: {fields}")
        given = dict(value)
    elif hasattr(value, "temperature"):
        given = {f: getattr(value, f) for f in fields if hasattr(value, f)}
    else:
        raise TypeError(f"sampling_params must be a SamplingParams (homefire's or tinker's) or "
                        f"a dict, got {type(value).__name__}")
    if given.get("stop") is not None and not isinstance(given["stop"], str):
        given["stop"] = list(given["stop"])
    return SamplingParams(**{k: v for k, v in given.items()
                             if v is not None or k in ("seed", "stop")})


StopReason = Literal["stop", "length"]
"""``stop``: a stop token or string (or end of sequence) ended it; ``length``: max_tokens did."""


@dataclass
class SampledSequence:
    """One sampled completion: its tokens (stop token included) and their logprobs."""

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    """``log p(token_i | prompt, tokens_<i)`` under the model at temperature 1 (what a forward
    pass gives), one per token."""
    topk_logprobs: list[list[tuple[int, float]]] | None = None
    """With ``sample(topk_sample_logprobs=k)``: the k most likely ``(token, logprob)`` at each
    sampled position."""


@dataclass
class SampleResponse:
    """Result of ``SamplingClient.sample``: ``num_samples`` sequences for the prompt."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    """With ``include_prompt_logprobs``: ``log p(prompt_i | prompt_<i)`` per prompt token;
    ``None`` for the first token (nothing predicts it)."""
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    """With ``topk_prompt_logprobs=k``: the k most likely ``(token, logprob)`` at each prompt
    position; ``None`` for the first token."""
