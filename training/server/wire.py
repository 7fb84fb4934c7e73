"""Tinker's protobuf messages to and from this package's types (the server side of
``tinker/proto/request_conv.py`` and ``response_conv.py``).

``forward_backward`` requests arrive as ``ForwardBackwardRequest`` protobuf; their results and
``asample``'s go back as ``ForwardBackwardOutput`` / ``SampleResponse`` protobuf. Everything
else on the wire is JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from training.sdk.types import (
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    SampleResponse,
    as_tensor_data,
)

__all__ = ["ForwardBackwardCall", "WireError", "forward_backward_call",
           "forward_backward_output_bytes", "sample_response_bytes"]

_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32,
          pb.DTYPE_BFLOAT16: np.uint16}
MASK_LOGPROB = -99999.0
"""Tinker's filler of top-k rows with nothing to report (``tinker/types/topk_logprobs.py``)."""


class WireError(ValueError):
    """A request body that does not decode; the message says which field."""


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    datums: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, Any]
    forward_only: bool


def forward_backward_call(body: bytes) -> ForwardBackwardCall:
    """Decode a ``ForwardBackwardRequest``.

    Raises:
        WireError: not a valid message, a non-text chunk, or a tensor of an unknown dtype or
            inconsistent size (named by datum and key).
    """
    message = pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except Exception as e:  # noqa: BLE001 (protobuf raises its own DecodeError types)
        raise WireError(f"the forward_backward body is not a ForwardBackwardRequest "
                        f"protobuf: {e}") from None
    datums = []
    for i, datum in enumerate(message.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise WireError(f"datum {i}: only text chunks are supported, got a "
                                f"{chunk.WhichOneof('chunk')} chunk")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        inputs = {key: as_tensor_data(key, _array(tensor, f"datum {i}: loss_fn_inputs[{key!r}]"))
                  for key, tensor in datum.loss_fn_inputs.items()}
        datums.append(Datum(model_input=ModelInput.from_ints(tokens), loss_fn_inputs=inputs))
    config: dict[str, Any] = {k: v for k, v in message.loss_fn_config.items()}
    for key, value in message.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    return ForwardBackwardCall(model_id=message.model_id, seq_id=message.seq_id, datums=datums,
                               loss_fn=message.loss_fn, loss_fn_config=config,
                               forward_only=message.forward_only)


def _array(tensor: Any, what: str) -> np.ndarray:
    dtype = _NUMPY.get(tensor.dtype)
    if dtype is None:
        raise WireError(f"{what} has unsupported dtype enum {tensor.dtype}")
    shape = list(tensor.shape)
    if tensor.WhichOneof("encoding") == "sparse_csr":
        values = np.frombuffer(tensor.sparse_csr.values, dtype=dtype)
        rows = np.frombuffer(tensor.sparse_csr.crow_indices, dtype=np.int64)
        cols = np.frombuffer(tensor.sparse_csr.col_indices, dtype=np.int64)
        if len(shape) != 2 or rows.size != shape[0] + 1 or cols.size != values.size:
            raise WireError(f"{what} is a malformed sparse CSR tensor")
        dense = np.zeros(shape, dtype=dtype)
        row_index = np.repeat(np.arange(shape[0]), np.diff(rows))
        dense[row_index, cols] = values
        array = dense
    else:
        array = np.frombuffer(tensor.dense, dtype=dtype)
        if shape:
            if int(np.prod(shape)) != array.size:
                raise WireError(f"{what} has {array.size} values for shape {shape}")
            array = array.reshape(shape)
    if dtype is np.uint16:  # bfloat16 bits
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _metric_key(key: str) -> str:
    """Tinker's clients split every metric key into ``name:reduction``."""
    return key if key.count(":") == 1 else f"{key.replace(':', '_')}:sum"


def forward_backward_output_bytes(output: ForwardBackwardOutput) -> bytes:
    """A ``ForwardBackwardOutput`` protobuf: one record holding every datum's outputs, each
    field's per-datum arrays joined with byte offsets."""
    message = pb.ForwardBackwardOutput(loss_fn_output_type=output.loss_fn_output_type)
    for key, value in output.metrics.items():
        message.metrics[_metric_key(key)] = float(value)
    record = message.loss_fn_outputs.add(type_tag="ArrayRecord",
                                         num_datums=len(output.loss_fn_outputs))
    names = list(output.loss_fn_outputs[0]) if output.loss_fn_outputs else []
    for name in names:
        arrays = [np.ascontiguousarray(out[name].to_numpy()) for out in output.loss_fn_outputs]
        _batched(record.fields[name], arrays)
    return message.SerializeToString()


def _batched(field: Any, arrays: Sequence[np.ndarray]) -> None:
    dtype = pb.DTYPE_INT64 if arrays[0].dtype.kind in "iub" else pb.DTYPE_FLOAT32
    arrays = [a.astype(np.int64 if dtype == pb.DTYPE_INT64 else np.float32) for a in arrays]
    field.dtype = dtype
    field.trailing_shape.extend(arrays[0].shape[1:])
    offsets = np.cumsum([0, *(a.nbytes for a in arrays)]).astype(np.int64)
    field.offsets = offsets.tobytes()
    field.data = b"".join(a.tobytes() for a in arrays)


def sample_response_bytes(response: SampleResponse) -> bytes:
    """A ``SampleResponse`` protobuf (``None`` prompt logprobs become NaN, empty top-k rows
    Tinker's mask value)."""
    message = pb.SampleResponse()
    for seq in response.sequences:
        out = message.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(seq.tokens, dtype=np.int32).tobytes())
        if seq.logprobs is not None:
            out.logprobs = np.asarray(seq.logprobs, dtype=np.float32).tobytes()
        if seq.topk_logprobs is not None:
            _topk(out.topk_sampled_logprobs, seq.topk_logprobs)
    if response.prompt_logprobs is not None:
        message.prompt_logprobs = np.asarray(
            [np.nan if x is None else x for x in response.prompt_logprobs],
            dtype=np.float32).tobytes()
    if response.topk_prompt_logprobs is not None:
        _topk(message.topk_prompt_logprobs, response.topk_prompt_logprobs)
    return message.SerializeToString()


def _topk(field: Any, rows: Sequence[Sequence[tuple[int, float]] | None]) -> None:
    k = max((len(r) for r in rows if r), default=0)
    ids = np.zeros((len(rows), k), dtype=np.int32)
    values = np.full((len(rows), k), MASK_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or []):
            ids[i, j], values[i, j] = token, logprob
    field.token_ids = ids.tobytes()
    field.logprobs = values.tobytes()
    field.k = k
    field.length = len(rows)
