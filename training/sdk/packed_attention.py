"""Attention over packed rows, one document at a time: PyTorch's CPU flash-attention kernels per
document on CPU, its variable-length flash-attention kernel (``varlen_attn``) on CUDA.

A packed row holds several documents that must not see each other. The dense way masks a
``row_len x row_len`` score matrix per head: the work grows with the square of the row, most of
it masked away (a row of three 100-token chats computes 90k scores to keep 15k). The attention
implementation registered here runs PyTorch's CPU flash-attention kernel with ``is_causal=True``
on each document's own span instead, in fp32 (for small heads it runs 2.5-4x faster than in
bf16), so the work is that of the documents alone and a whole batch packs into one row with no
padding. Measured on the 10M tiny model, 2 threads: 1.25x the dense masked rows' tokens/s in
eager mode, 1.3-1.4x compiled (``benchmarks/README.md``).

Documents are found the way ``transformers``' padding-free training finds them: every position
id 0 starts one (``position_ids`` reach the attention function of every model whose decoder
layers pass them on, as Llama, Qwen, Mistral and their kin do). The training client switches a
model to it only for the duration of its own packed forward passes (:func:`packed_attention`),
so a user calling the model directly gets the model's own attention.

On CUDA the documents of a row are the sequences of ``torch.nn.attention.varlen.varlen_attn``
(cumulative offsets from the same position ids, grouped-query heads as they are): one kernel
call per layer, no mask, in the half-precision dtype autocast gives (flash attention has no fp32
kernel, so without bf16/fp16 autocast a GPU keeps the dense masked rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

PACKED_ATTENTION = "homefire_packed"
"""The ``config._attn_implementation`` name registered here."""


def supports_packed_attention(model: torch.nn.Module, device: torch.device,
                              autocast_dtype: torch.dtype | None = None) -> bool:
    """True for a ``transformers`` model with rotary positions whose layers all attend fully
    (no sliding windows, no attention dropout) through ``config._attn_implementation``, on CPU,
    or on CUDA under bf16/fp16 autocast where torch has ``varlen_attn``."""
    if device.type == "cuda":
        if autocast_dtype not in (torch.bfloat16, torch.float16) or not _has_varlen():
            return False
    elif device.type != "cpu":
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    if getattr(config, "use_sliding_window", False) or getattr(config, "attention_dropout", 0):
        return False
    # Padding continues counting positions as a document of its own: fine for rotary
    # positions, not for learned absolute ones.
    return any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules())


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s attention per document (rows packed with position ids restarting at 0
    for every document and for the padding after the last one)."""
    _register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Any, dropout: float = 0.0,
                             scaling: float | None = None, position_ids: Any = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``transformers`` attention interface: ``query`` is ``[rows, heads, row_len, head_dim]``,
    ``key``/``value`` ``[rows, kv_heads, row_len, head_dim]``; returns ``[rows, row_len, heads,
    head_dim]``."""
    if position_ids is None:
        raise ValueError("packed attention needs position_ids (0 at the start of every "
                         "document); this model's layers do not pass them to attention")
    if dropout:
        raise ValueError("packed attention does not apply attention dropout; set the model's "
                         "attention_dropout to 0")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    position_ids = position_ids.expand(query.shape[0], -1)
    if query.is_cuda:
        return varlen_document_attention(query, key, value, position_ids, scale), None
    out = document_attention(query, key, value, position_ids, scale)
    return out.transpose(1, 2).contiguous(), None


def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401 (torch >= 2.9)
    except ImportError:
        return False
    return True


def varlen_document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              position_ids: torch.Tensor, scale: float) -> torch.Tensor:
    """CUDA: causal attention within each document through ``varlen_attn``. Inputs as
    :func:`document_attention`'s; returns ``[rows, row_len, heads, head_dim]`` (the layout the
    attention interface returns)."""
    from torch.nn.attention.varlen import varlen_attn

    rows, heads, row_len, head_dim = query.shape
    dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16

    def tokens(x: torch.Tensor) -> torch.Tensor:  # [rows, h, len, d] -> [rows * len, h, d]
        return x.transpose(1, 2).reshape(rows * row_len, x.shape[1], head_dim).to(dtype)

    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed attention: the position ids do not start at 0")
    # Every row starts a document (its first position id is 0), so row boundaries are
    # document boundaries too.
    cu_seq = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu_seq[1:] - cu_seq[:-1]).max())
    out = varlen_attn(tokens(query), tokens(key), tokens(value), cu_seq, cu_seq, longest,
                      longest, scale=scale, window_size=(-1, 0),
                      enable_gqa=key.shape[1] != heads)
    return out.reshape(rows, row_len, heads, head_dim).to(query.dtype)


# One opaque op for torch.compile: the per-document loop depends on each batch's lengths, which a
# traced graph would recompile for (or break around, twice per layer). Forward and backward call
# PyTorch's CPU flash-attention kernels on each document's span, in fp32 even under bf16
# autocast for small heads (head_dim 32, 64-256 tokens: 2.5-4x faster in fp32), in bf16 for wide
# ones (see _compute_dtype).
_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@torch.library.custom_op("homefire::document_attention", mutates_args=())
def _document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        position_ids: torch.Tensor, scale: float,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention within each document of each row (a document starts at position id 0).
    Returns the output in ``query``'s dtype and, for the backward, the output in the compute
    dtype and the (fp32) log-sum-exp of each query's scores."""
    q, k, v = _heads(query, key, value)
    spans = _document_spans(position_ids)
    outs, lses = [], []
    for at in spans:
        out, lse = _flash_forward(q[at], k[at], v[at], 0.0, True, scale=scale)
        outs.append(out)
        lses.append(lse)
    out = _join(outs, spans)
    # A custom op's outputs may not alias each other: a copy when query is fp32 already.
    return out.to(query.dtype, copy=True), out, _join(lses, spans)


# The fake (shape-only) versions for torch.compile: every output is a fresh contiguous tensor.
@_document_attention.register_fake
def _(query, key, value, position_ids, scale):
    return (query.new_empty(query.shape),
            query.new_empty(query.shape, dtype=_compute_dtype(query)),
            query.new_empty(query.shape[:3], dtype=torch.float32))


@torch.library.custom_op("homefire::document_attention_backward", mutates_args=())
def _document_attention_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 position_ids: torch.Tensor, scale: float,
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _heads(query, key, value)
    grad = grad.to(q.dtype)
    spans = _document_spans(position_ids)
    dqs, dks, dvs = [], [], []
    for at in spans:
        dq, dk, dv = _flash_backward(grad[at], q[at], k[at], v[at], out[at], lse[at], 0.0, True,
                                     scale=scale)
        dqs.append(dq)
        dks.append(dk)
        dvs.append(dv)
    dq, dk, dv = (_join(parts, spans) for parts in (dqs, dks, dvs))
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # each kv head served `groups` query heads: its gradient is their sum
        dk = dk.unflatten(1, (key.shape[1], groups)).sum(2)
        dv = dv.unflatten(1, (key.shape[1], groups)).sum(2)
    return (dq.to(query.dtype).contiguous(), dk.to(key.dtype).contiguous(),
            dv.to(value.dtype).contiguous())


@_document_attention_backward.register_fake
def _(grad, query, key, value, out, lse, position_ids, scale):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    query, key, value, position_ids, scale = inputs
    ctx.save_for_backward(query, key, value, output[1], output[2], position_ids)
    ctx.scale = scale


def _backward(ctx: Any, grad: torch.Tensor, _grad_fp32: Any, _grad_lse: Any) -> tuple:
    query, key, value, out, lse, position_ids = ctx.saved_tensors
    dq, dk, dv = _document_attention_backward(grad, query, key, value, out, lse, position_ids,
                                              ctx.scale)
    return dq, dk, dv, None, None


_document_attention.register_autograd(_backward, setup_context=_setup_context)


def document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       position_ids: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention within each document: ``[rows, heads, row_len, head_dim]`` inputs
    (``key``/``value`` may have fewer heads), ``[rows, row_len]`` position ids that restart at
    0 for every document; returns ``[rows, heads, row_len, head_dim]`` in ``query``'s dtype."""
    return _document_attention(query, key, value, position_ids, scale)[0]


FP32_HEAD_DIM_LIMIT = 64
"""Heads up to this wide attend in fp32 even under bf16 autocast; wider ones in bf16. Measured
with PyTorch's CPU flash-attention kernels, forward + backward of one causal document, 2 threads:
head_dim 32 (4 heads, 128 tokens) fp32 0.20 ms vs bf16 0.68; 64 (9 heads, 200 tokens) 1.65 vs
2.11; 128 (16 heads, 200 tokens) 6.17 vs 4.43, 400 tokens 20.2 vs 10.5."""


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    wide = query.shape[-1] > FP32_HEAD_DIM_LIMIT
    return torch.bfloat16 if wide and query.dtype == torch.bfloat16 else torch.float32


def _heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``query``, ``key``, ``value`` in the compute dtype, with grouped-query heads repeated."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    dtype = _compute_dtype(query)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def _document_spans(position_ids: torch.Tensor) -> list[tuple[slice, slice, slice]]:
    """Index of each document, ``[row:row+1, :, begin:end]``, row by row (4-d slices: the CPU
    flash-attention kernels take only ``[batch, heads, len, dim]``)."""
    row_len = position_ids.shape[1]
    by_row: list[list[int]] = [[] for _ in range(position_ids.shape[0])]
    for row, offset in (position_ids == 0).nonzero().tolist():
        by_row[row].append(offset)
    spans = []
    for row, offsets in enumerate(by_row):
        if not offsets or offsets[0] != 0:
            raise ValueError(f"packed attention: row {row}'s position ids do not start at 0")
        for begin, end in zip(offsets, [*offsets[1:], row_len], strict=True):
            spans.append((slice(row, row + 1), slice(None), slice(begin, end)))
    return spans


def _join(parts: list[torch.Tensor], spans: list[tuple[slice, slice, slice]]) -> torch.Tensor:
    """Per-document pieces (in :func:`_document_spans` order) back into ``[rows, ...]``."""
    rows: list[list[torch.Tensor]] = []
    for part, (row, _, _) in zip(parts, spans, strict=True):
        if row.start == len(rows):
            rows.append([])
        rows[-1].append(part)
    return torch.cat([torch.cat(p, dim=2) if len(p) > 1 else p[0] for p in rows]).contiguous()


def _register() -> None:
    from transformers import AttentionInterface

    # No mask function is registered for it: transformers then passes attention_mask=None.
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
