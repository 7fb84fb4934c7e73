"""Per-document attention over packed rows equals a block-diagonal causal mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.sdk.packed_attention import (
    PACKED_ATTENTION,
    document_attention,
    packed_attention,
    supports_packed_attention,
)

DOCUMENTS = [[10, 25, 5], [40]]  # per row; the last "document" of row 0 stands for padding
ROW_LEN, HEADS, KV_HEADS, HEAD_DIM, SCALE = 40, 4, 2, 16, 0.3


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids restarting at every document, and the equivalent dense mask."""
    position_ids = torch.zeros(len(DOCUMENTS), ROW_LEN, dtype=torch.long)
    segment = torch.zeros(len(DOCUMENTS), ROW_LEN, dtype=torch.long)
    for row, lengths in enumerate(DOCUMENTS):
        start = 0
        for i, length in enumerate(lengths):
            position_ids[row, start:start + length] = torch.arange(length)
            segment[row, start:start + length] = i
            start += length
    causal = torch.ones(ROW_LEN, ROW_LEN, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    return position_ids, mask[:, None]


def _inputs(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    torch.manual_seed(0)
    # Strided like a model's (a transpose of [rows, len, heads, dim]), with grouped kv heads.
    return [torch.randn(len(DOCUMENTS), ROW_LEN, heads, HEAD_DIM, dtype=dtype)
            .transpose(1, 2).requires_grad_() for heads in (HEADS, KV_HEADS, KV_HEADS)]


def _dense(query, key, value, mask):
    groups = HEADS // KV_HEADS
    return F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1),
                                          value.repeat_interleave(groups, 1), attn_mask=mask,
                                          scale=SCALE)


@pytest.mark.parametrize("compiled", [False, True])
def test_document_attention_matches_the_dense_mask(compiled):
    position_ids, mask = _rows()
    inputs = _inputs()
    expected = _dense(*inputs, mask)
    attend = torch.compile(document_attention, dynamic=True) if compiled else document_attention
    got = attend(*inputs, position_ids, SCALE)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(expected)
    for want, have in zip(torch.autograd.grad(expected, inputs, grad),
                          torch.autograd.grad(got, inputs, grad), strict=True):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)


def test_document_attention_is_a_valid_custom_op():
    position_ids, _ = _rows()
    torch.library.opcheck(torch.ops.homefire.document_attention.default,
                          (*_inputs(), position_ids, SCALE))


def test_bf16_inputs_come_back_in_bf16():
    position_ids, mask = _rows()
    inputs = _inputs(torch.bfloat16)
    got = document_attention(*inputs, position_ids, SCALE)
    assert got.dtype == torch.bfloat16
    expected = _dense(*(t.float() for t in inputs), mask)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    got.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in inputs)


def test_rows_must_start_a_document():
    position_ids, _ = _rows()
    position_ids[1, 0] = 3
    with pytest.raises(ValueError, match="row 1's position ids do not start at 0"):
        document_attention(*_inputs(), position_ids, SCALE)


def test_the_model_gets_its_own_attention_back(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert supports_packed_attention(model, torch.device("cpu"))
    assert not supports_packed_attention(model, torch.device("cuda"))
    before = model.config._attn_implementation
    with packed_attention(model):
        assert model.config._attn_implementation == PACKED_ATTENTION
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError), packed_attention(model):
        raise RuntimeError("a failed forward pass")
    assert model.config._attn_implementation == before
    assert "homefire" not in model.config.to_json_string()


def test_the_cuda_varlen_path_hands_the_kernel_each_document(monkeypatch):
    """The plumbing of the CUDA path (token layout, cumulative offsets, GQA, output layout),
    run on CPU with a stand-in for ``varlen_attn`` that attends within each offset span: it
    must equal the CPU per-document path. (tests/test_gpu.py checks the real kernel.)"""
    import torch.nn.attention.varlen as varlen

    from training.sdk.packed_attention import document_attention, varlen_document_attention

    calls = []

    def stand_in(query, key, value, cu_q, cu_k, max_q, max_k, *, scale, window_size,
                 enable_gqa):
        calls.append((cu_q.tolist(), max_q, window_size, enable_gqa))
        assert cu_q.dtype == torch.int32 and cu_k is cu_q and max_k == max_q
        outs = []
        for begin, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            q, k, v = (t[begin:end].transpose(0, 1)[None].float() for t in (query, key, value))
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1))
        return torch.cat(outs).to(query.dtype)

    monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    torch.manual_seed(0)
    lengths = [5, 9, 2]
    query = torch.randn(1, 4, 16, 8, dtype=torch.bfloat16)
    key, value = torch.randn(1, 2, 16, 8, dtype=torch.bfloat16), torch.randn(1, 2, 16, 8,
                                                                              dtype=torch.bfloat16)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    out = varlen_document_attention(query, key, value, positions, 8 ** -0.5)
    assert calls == [([0, 5, 14, 16], 9, (-1, 0), True)]
    assert out.shape == (1, 16, 4, 8) and out.dtype == torch.bfloat16
    expected = document_attention(query, key, value, positions, 8 ** -0.5).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_cuda_attends_per_document_only_under_half_precision_autocast(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from training.sdk.packed_attention import supports_packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cuda = torch.device("cuda")  # the decision only: nothing runs on it
    assert supports_packed_attention(model, cuda, torch.bfloat16)
    assert supports_packed_attention(model, cuda, torch.float16)
    assert not supports_packed_attention(model, cuda, None)  # flash attention has no fp32
    assert supports_packed_attention(model, torch.device("cpu"))


def test_wide_heads_attend_in_bf16_and_match_the_fp32_reference():
    """head_dim > 64 under bf16 runs the kernels in bf16 (faster there); values and gradients
    stay within bf16's precision of the fp32 computation."""
    from training.sdk.packed_attention import _compute_dtype, document_attention

    torch.manual_seed(0)
    lengths = [40, 25, 31]
    query = torch.randn(1, 8, sum(lengths), 128)
    key, value = torch.randn(1, 2, sum(lengths), 128), torch.randn(1, 2, sum(lengths), 128)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    assert _compute_dtype(query.bfloat16()) == torch.bfloat16
    assert _compute_dtype(query) == torch.float32
    assert _compute_dtype(query[..., :64].bfloat16()) == torch.float32
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (query, key, value))
        out = document_attention(q, k, v, positions, 128 ** -0.5)
        assert out.dtype == dtype
        out.float().sum().backward()
        results.append((out.float(), *(t.grad.float() for t in (q, k, v))))
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, atol=5e-2, rtol=5e-2)
