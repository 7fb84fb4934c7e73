"""The CUDA paths: per-document (varlen) attention against the CPU reference, training on it,
and the vLLM engine's sampling and log-probs against the trainer's. Skipped without a GPU (and
without vllm for the engine); ``scripts/gpu_check.sh`` runs them with the GPU benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.sdk import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient
from training.sdk.packed_attention import _has_varlen, varlen_document_attention

from .conftest import TEST_MODEL
from .test_training_client import _datum, _train

REPO = Path(__file__).resolve().parent.parent

def needs_cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(),
                                              reason="needs a CUDA GPU")(test))


def needs_varlen(test):
    return pytest.mark.gpu(pytest.mark.skipif(
        not (torch.cuda.is_available() and _has_varlen()),
        reason="needs a CUDA GPU and torch's varlen_attn")(test))


def _reference_attention(query, key, value, lengths):
    """Each document alone through SDPA, causal, in fp32 on CPU."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    outs, start = [], 0
    for length in lengths:
        span = slice(start, start + length)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, span].float().cpu(), key[:, :, span].float().cpu(),
            value[:, :, span].float().cpu(), is_causal=True))
        start += length
    return torch.cat(outs, dim=2).transpose(1, 2)  # [rows, len, heads, dim]


@needs_varlen
def test_varlen_document_attention_matches_each_document_alone():
    torch.manual_seed(0)
    lengths = [30, 50, 16]
    heads, kv_heads, dim = 8, 2, 64
    query = torch.randn(1, heads, sum(lengths), dim, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True)
    key = torch.randn(1, kv_heads, sum(lengths), dim, device="cuda", dtype=torch.bfloat16,
                      requires_grad=True)
    value = torch.randn_like(key, requires_grad=True)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    out = varlen_document_attention(query, key, value, positions, dim ** -0.5)
    expected = _reference_attention(query.detach(), key.detach(), value.detach(), lengths)
    torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=2e-2)
    # Gradients against the same reference (autograd through the fp32 CPU version).
    grad = torch.randn_like(out)
    out.backward(grad)
    q, k, v = (t.detach().float().cpu().requires_grad_() for t in (query, key, value))
    _reference_attention(q, k, v, lengths).backward(grad.float().cpu())
    for ours, reference in ((query, q), (key, k), (value, v)):
        torch.testing.assert_close(ours.grad.float().cpu(), reference.grad, atol=5e-2,
                                   rtol=5e-2)


@needs_varlen
def test_training_on_cuda_attends_per_document_like_dense_masks(store_root, tiny_model_dir):
    service = ServiceClient(store_root, device="cuda", mixed_precision="bf16")
    client = service.create_training_client(TEST_MODEL)
    assert client._per_document_attention
    data = [Datum(model_input=ModelInput.from_ints(list(range(5, 5 + n))),
                  loss_fn_inputs={"target_tokens": list(range(6, 6 + n))}) for n in (40, 17, 63)]
    packed = client.forward(data).result()
    client._per_document_attention = False  # the dense block-diagonal masks
    dense = client.forward(data).result()
    for a, b in zip(packed.loss_fn_outputs, dense.loss_fn_outputs, strict=True):
        torch.testing.assert_close(a["logprobs"].to_torch(), b["logprobs"].to_torch(),
                                   atol=5e-2, rtol=0)
    client._per_document_attention = True
    client.forward_backward(data).result()
    assert client.optim_step(AdamParams(learning_rate=1e-3)).result().metrics["non_finite"] == 0


@needs_cuda
def test_the_vllm_engine_samples_and_scores_like_the_trainer(store_root, tiny_model_dir):
    from training.sdk import DeploymentManager, vllm_available

    if not vllm_available():
        pytest.skip("needs the vllm package")
    service = ServiceClient(store_root, device="cuda", mixed_precision="no",
                            sampler_dtype="bfloat16")
    trainer = service.create_training_client(TEST_MODEL, lora_rank=8)
    manager = DeploymentManager(service.store, engine="vllm")
    deployment = manager.create_deployment(TEST_MODEL, "gpu-check")
    _train(trainer, [_datum(list(range(3, 40)))], 3, lr=5e-2)
    manager.hotload("gpu-check", trainer.save_weights_for_sampler_ext("lora-1").path)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]]
    out = deployment.sample(prompts, SamplingParams(max_tokens=8, temperature=0.0),
                            num_samples=1)
    assert [len(seqs) for seqs in out] == [1, 1, 1]  # one batched call, every prompt answered
    for prompt, (seq,) in zip(prompts, out, strict=True):
        full = prompt + seq.tokens
        scored = trainer.forward([Datum(model_input=ModelInput.from_ints(full[:-1]),
                                        loss_fn_inputs={"target_tokens": full[1:]})]).result()
        expected = scored.loss_fn_outputs[0]["logprobs"].to_torch()[len(prompt) - 1:]
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected.cpu().float(),
                                   atol=0.1, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run of a machine without a GPU")
def test_gpu_check_says_what_it_skipped_without_a_gpu():
    import os
    import subprocess
    import sys

    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU here. Skipped:" in done.stdout
    assert "SKIPPED [1] tests/test_gpu.py" in done.stdout and "5 skipped" in done.stdout


def test_gpu_check_runs_every_file_with_gpu_tests():
    import re

    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    listed = set(re.search(r'GPU_TESTS="([^"]+)"', script).group(1).split())
    marked = {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
              if "mark.gpu" in p.read_text() and p.name != "test_gpu.py"} | {"tests/test_gpu.py"}
    assert listed == marked
