"""Wire types of the training API, with the Tinker / Fireworks names and fields.

These are plain dataclasses owned by this project (no dependency on the ``tinker`` package), so a
script written against the hosted SDK ports by changing its imports.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

LossFnType = Literal["cross_entropy"]
"""Names of the built-in losses accepted by ``forward`` / ``forward_backward``."""

_TORCH_DTYPES = {"int64": torch.int64, "float32": torch.float32, "int32": torch.int32,
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


def _as_tensor_data(value: Any) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if isinstance(value, torch.Tensor):
        return TensorData.from_torch(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    raise TypeError(f"loss_fn_inputs values must be TensorData, torch.Tensor or numpy arrays, "
                    f"got {type(value).__name__}")


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
        self.loss_fn_inputs = {k: _as_tensor_data(v) for k, v in self.loss_fn_inputs.items()}


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


class GradAccNormalization(str, enum.Enum):
    """How ``optim_step`` normalizes gradients accumulated over ``forward_backward`` calls."""

    NUM_LOSS_TOKENS = "num_loss_tokens"
    """Divide by the number of positions with non-zero weight since the last step."""
    NUM_SEQUENCES = "num_sequences"
    """Divide by the number of datums since the last step."""
    NONE = "none"
    """Raw gradient sum (the built-in losses are sums over positions)."""


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
