"""Packing several sequences into fewer rows for one forward pass, each attending only to
itself (block-diagonal causal masks, or back to back for per-document attention kernels), and
the model call that scores the packed targets.

:func:`pack_sequences` decides where each sequence goes; :func:`token_logprobs` runs the model
on the packed rows; :func:`pack_routing` / :func:`unpack_routing` move MoE routing matrices
between per-sequence and packed layouts (routing replay).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

__all__ = ["MAX_LOGITS", "WIDE_ROW_LIMIT", "PackedBatch", "pack_routing", "pack_sequences",
           "token_logprobs", "unpack_routing"]


@dataclass
class PackedBatch:
    """Several sequences packed into fewer rows, each sequence attending only to itself."""

    input_ids: torch.Tensor
    """[rows, row_len] token ids (padding where no sequence was placed)."""
    target_ids: torch.Tensor
    """[rows, row_len] the target of each position (0 on padding)."""
    position_ids: torch.Tensor
    """[rows, row_len] positions that restart at 0 for every sequence."""
    attention_mask: torch.Tensor | None
    """[rows, 1, row_len, row_len] bool: causal within a sequence, nothing across sequences
    (None when packed for per-document attention: the position ids say where each starts)."""
    placements: list[tuple[int, int, int]]
    """(row, offset, length) of each input sequence, in input order."""


def pack_sequences(inputs: Sequence[Sequence[int]], targets: Sequence[torch.Tensor], *,
                   pad_id: int, multiple_of: int = 16, attention_cost: float | None = None,
                   per_document_attention: bool = False) -> PackedBatch:
    """Pack sequences into rows, each sequence attending only to itself.

    With ``per_document_attention`` (the model attends within each document itself, see
    :mod:`training.sdk.packed_attention`) every sequence goes into one row, back to back: no
    padding but the rounding of its length. Otherwise rows carry a block-diagonal causal mask
    and sequences are packed first-fit-decreasing: short sequences share rows instead of
    padding alone (chat batches are often half padding). Rows are then as long as the longest
    sequence, or, with ``attention_cost``, up to twice that when wider rows leave less padding: a
    position costs ``1 + row_len / attention_cost`` (the masked attention over the whole row
    grows with its length; about ``5 * hidden_size`` on CPU), and the row length with the least
    total cost wins. Row lengths are multiples of ``multiple_of`` so kernels see few distinct
    shapes. Position ids restart at 0 for every sequence and for the padding after the last one.
    Per-sequence results equal those of running each sequence alone, up to float rounding.
    """
    lengths = [len(t) for t in inputs]
    if per_document_attention:
        row_len = -(-sum(lengths) // multiple_of) * multiple_of
        offsets = [0, *itertools.accumulate(lengths)][:-1]
        placements, rows = [(0, o, n) for o, n in zip(offsets, lengths, strict=True)], 1
    else:
        row_len = _packed_row_length(lengths, multiple_of, attention_cost)
        placements, rows = _first_fit_decreasing(lengths, row_len)
    input_ids = torch.full((rows, row_len), pad_id, dtype=torch.long)
    target_ids = torch.zeros((rows, row_len), dtype=torch.long)
    position_ids = torch.zeros((rows, row_len), dtype=torch.long)
    used = [0] * rows
    for i, (row, offset, length) in enumerate(placements):
        input_ids[row, offset:offset + length] = torch.as_tensor(inputs[i], dtype=torch.long)
        target_ids[row, offset:offset + length] = targets[i]
        position_ids[row, offset:offset + length] = torch.arange(length)
        used[row] = max(used[row], offset + length)
    for row, end in enumerate(used):
        position_ids[row, end:] = torch.arange(row_len - end)
    if per_document_attention:
        return PackedBatch(input_ids, target_ids, position_ids, None, placements)
    segment = torch.full((rows, row_len), -1, dtype=torch.long)
    for i, (row, offset, length) in enumerate(placements):
        segment[row, offset:offset + length] = i
    index = torch.arange(row_len)
    causal = index[None, :] <= index[:, None]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    # Padding attends to itself so no softmax row is empty (an all-masked row gives NaN).
    mask = (same & causal) | torch.eye(row_len, dtype=torch.bool)
    return PackedBatch(input_ids, target_ids, position_ids, mask[:, None], placements)


MAX_LOGITS = 2 ** 24
"""Most logits :func:`token_logprobs` holds at once (64 MB in fp32): a batch whose
``positions x vocabulary`` is larger is scored in chunks of positions."""


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, target_ids: torch.Tensor, *,
                   max_logits: int | None = MAX_LOGITS) -> torch.Tensor:
    """``[rows, row_len]`` log-probs (fp32) of ``target_ids`` under ``model``'s logits.

    A large vocabulary makes the logits the biggest tensor of a step (a 0.6B model's 151,936
    columns: 2.4 GB in fp32 for 4,096 positions, held again by the log-softmax for backward).
    When ``positions x vocabulary`` exceeds ``max_logits`` (None: never), the model's body runs
    once and the output layer, log-softmax and gather run over chunks of positions, each
    recomputed in backward (activation checkpointing) instead of kept: at most one chunk's
    logits exist at a time, for one more forward of the output layer. Same values up to float
    summation order. Models whose logits are more than their output layer's (Gemma's soft-
    capping, a logit scale) and FSDP-sharded models take the whole-batch path.
    """
    vocab = _chunkable_vocab(model)
    if max_logits is None or vocab is None or target_ids.numel() * vocab <= max_logits:
        logits = model(input_ids=input_ids, position_ids=position_ids,
                       attention_mask=attention_mask, use_cache=False).logits
        return -F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                target_ids.reshape(-1), reduction="none").reshape(target_ids.shape)
    hidden = model.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                 attention_mask=attention_mask, use_cache=False).last_hidden_state
    return chunked_logprobs(model.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1]),
                            target_ids.reshape(-1), max_logits).reshape(target_ids.shape)


def chunked_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                     max_logits: int) -> torch.Tensor:
    """``[positions]`` log-probs of ``targets`` under ``head(hidden)`` with at most
    ``max_logits`` logits in memory at a time.

    A plain output layer (a weight, no bias) is scored over chunks of its vocabulary
    (:class:`_VocabChunkedLogprobs`): a running log-sum-exp forward, the chunk's logits
    recomputed in backward, each chunk's weight gradient its own slice, nothing accumulated at
    full size. Any other head (a LoRA adapter on ``lm_head``) runs over chunks of positions
    under activation checkpointing instead.
    """
    if type(head) is torch.nn.Linear and head.bias is None:
        device = hidden.device.type
        dtype = (torch.get_autocast_dtype(device) if device in ("cpu", "cuda")
                 and torch.is_autocast_enabled(device) else hidden.dtype)
        columns = max(1, max_logits // max(targets.numel(), 1))
        return _VocabChunkedLogprobs.apply(hidden, head.weight, targets, columns, dtype)
    size = max(1, max_logits // head.weight.shape[0])
    pieces = []
    for start in range(0, targets.numel(), size):
        chunk = (head, hidden[start:start + size], targets[start:start + size])
        if torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *chunk,
                                                            use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*chunk))
    return torch.cat(pieces)


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


class _VocabChunkedLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[i, targets[i]]`` over ``columns`` vocabulary entries at
    a time: matmuls in ``dtype`` (autocast's), log-sum-exp and softmax in fp32, as the
    whole-batch path computes them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                columns: int, dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
            picked = torch.zeros(h.shape[0], device=h.device)
            for start in range(0, weight.shape[0], columns):
                logits = (h @ weight[start:start + columns].to(dtype).T).float()
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
                rows, cols = _targets_in(targets, start, logits.shape[1])
                picked[rows] = logits[rows, cols]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.columns, ctx.hidden_dtype = columns, hidden.dtype
        return picked - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        h, weight, targets, lse = ctx.saved_tensors
        grad = grad.float()
        grad_hidden = torch.zeros(h.shape, device=h.device) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, weight.shape[0], ctx.columns):
                chunk = weight[start:start + ctx.columns].to(h.dtype)
                logits = (h @ chunk.T).float()
                # d logprob_i / d logit_ij = [j == target_i] - softmax_ij
                dlogits = torch.exp(logits - lse[:, None]).mul_(-grad[:, None])
                rows, cols = _targets_in(targets, start, logits.shape[1])
                dlogits[rows, cols] += grad[rows]
                dlogits = dlogits.to(h.dtype)
                if grad_hidden is not None:
                    grad_hidden += dlogits @ chunk  # [positions, hidden]: small
                if grad_weight is not None:
                    grad_weight[start:start + ctx.columns] = dlogits.T @ h
        return (grad_hidden.to(ctx.hidden_dtype) if grad_hidden is not None else None,
                grad_weight, None, None, None)


def _targets_in(targets: torch.Tensor, start: int, width: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose target falls in vocabulary columns ``[start, start + width)``, and its
    column within them."""
    rows = ((targets >= start) & (targets < start + width)).nonzero().flatten()
    return rows, targets[rows] - start


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_multiplier_scale")
"""Config fields of models whose forward does more to the logits than the output layer."""


def _chunkable_vocab(model: torch.nn.Module) -> int | None:
    """The vocabulary size if ``model``'s logits are exactly its output layer applied to its
    decoder's last hidden states (so :func:`token_logprobs` may chunk them), else None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_decoder") or any(
            getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in (model, getattr(model, "base_model", None))):
        return None  # the root's unshard hook runs only when the root module is called
    vocab = getattr(config, "vocab_size", None)
    return vocab if isinstance(vocab, int) and vocab > 0 else None


def _first_fit_decreasing(lengths: Sequence[int], row_len: int,
                          ) -> tuple[list[tuple[int, int, int]], int]:
    """(row, offset, length) of each sequence, longest placed first, and the number of rows."""
    free: list[int] = []
    placements: list[tuple[int, int, int]] = [(0, 0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, space in enumerate(free) if space >= lengths[i]), None)
        if row is None:
            free.append(row_len)
            row = len(free) - 1
        placements[i] = (row, row_len - free[row], lengths[i])
        free[row] -= lengths[i]
    return placements, len(free)


WIDE_ROW_LIMIT = 1024
"""Rows are widened (see :func:`pack_sequences`) only up to this many positions: the masked
attention of a row holds ``row_len ** 2`` scores per head."""


def _packed_row_length(lengths: Sequence[int], multiple_of: int,
                       attention_cost: float | None) -> int:
    """The row length of :func:`pack_sequences`: the cheapest of up to 16 candidates between the
    longest sequence and twice that."""
    longest = -(-max(lengths) // multiple_of) * multiple_of
    widest = min(2 * longest, max(longest, WIDE_ROW_LIMIT // multiple_of * multiple_of))
    if attention_cost is None or widest == longest or len(lengths) < 2:
        return longest
    stride = max(multiple_of, -(-(widest - longest) // 16 // multiple_of) * multiple_of)
    best_cost, best_len = float("inf"), longest
    for row_len in range(longest, widest + 1, stride):
        rows = _first_fit_decreasing(lengths, row_len)[1]
        cost = rows * row_len * (1 + row_len / attention_cost)
        if cost < best_cost:
            best_cost, best_len = cost, row_len
    return best_len


def pack_routing(routing: list[torch.Tensor], batch: PackedBatch) -> list[torch.Tensor]:
    """Per MoE layer, the ``[rows * row_len, top_k]`` experts of every packed position (the
    order routers see tokens in); padding goes to experts ``0..top_k-1`` (its output is
    never read)."""
    rows, row_len = batch.input_ids.shape
    layers, top_k = routing[0].shape[1:]
    flat = torch.arange(top_k).expand(rows * row_len, layers, top_k).clone()
    for (row, offset, length), matrix in zip(batch.placements, routing, strict=True):
        start = row * row_len + offset
        flat[start:start + length] = matrix
    return [flat[:, layer] for layer in range(layers)]


def unpack_routing(captured: list[torch.Tensor], batch: PackedBatch) -> list[torch.Tensor]:
    """Each sequence's ``[tokens, moe_layers, top_k]`` routing from one packed forward pass's
    per-router ``[rows * row_len, top_k]`` captures."""
    stacked = torch.stack(captured, dim=1)
    row_len = batch.input_ids.shape[1]
    return [stacked[row * row_len + offset:row * row_len + offset + length].clone()
            for row, offset, length in batch.placements]
