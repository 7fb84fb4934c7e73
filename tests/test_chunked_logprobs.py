"""Large vocabularies: token log-probs scored over chunks of positions (never the whole batch's
logits at once) equal the whole-batch values and gradients."""

from __future__ import annotations

import pytest
import torch
import transformers

from training.sdk import AdamParams, ServiceClient
from training.sdk import training_client as training_client_module
from training.sdk.lora import apply_lora
from training.sdk.packing import _chunkable_vocab, token_logprobs

from .conftest import TEST_MODEL
from .test_training_client import _datum


def _model(lora: bool = False):
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8,
                                      tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return apply_lora(model, rank=4, target_modules=["q_proj", "v_proj", "lm_head"]) if lora \
        else model


def _score(model, max_logits):
    torch.manual_seed(1)
    input_ids = torch.randint(0, 300, (2, 40))
    targets = torch.randint(0, 300, (2, 40))
    positions = torch.arange(40).repeat(2, 1)
    weights = torch.rand(2, 40)
    model.zero_grad(set_to_none=True)
    logprobs = token_logprobs(model, input_ids, positions, None, targets, max_logits=max_logits)
    (logprobs * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), grads


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_logprobs_and_gradients_equal_the_whole_batch(lora):
    model = _model(lora)
    assert _chunkable_vocab(model) == 300
    whole, whole_grads = _score(model, max_logits=None)
    # 7 positions per chunk (80 positions: 12 chunks, the last one short)
    chunked, chunked_grads = _score(model, max_logits=300 * 7)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    assert chunked_grads.keys() == whole_grads.keys() and whole_grads
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # forward only: chunks without checkpointing
        torch.testing.assert_close(token_logprobs(
            model, torch.ones(1, 9, dtype=torch.long), torch.arange(9)[None], None,
            torch.ones(1, 9, dtype=torch.long), max_logits=300), token_logprobs(
            model, torch.ones(1, 9, dtype=torch.long), torch.arange(9)[None], None,
            torch.ones(1, 9, dtype=torch.long), max_logits=None))


def test_models_that_transform_their_logits_are_never_chunked():
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8)
    assert config.final_logit_softcapping  # logits = cap * tanh(head(h) / cap)
    assert _chunkable_vocab(transformers.AutoModelForCausalLM.from_config(config)) is None


def test_a_training_client_scores_in_chunks_with_the_same_results(store_root, tiny_model_dir,
                                                                  monkeypatch):
    def client(max_logits):
        monkeypatch.setattr(training_client_module, "MAX_LOGITS", max_logits)
        torch.manual_seed(0)
        service = ServiceClient(store_root, device="cpu", mixed_precision="no")
        return service.create_training_client(TEST_MODEL)

    from training.sdk import packing

    chunks = []
    scored = packing._targets_in  # once per vocabulary chunk, forward and backward
    monkeypatch.setattr(packing, "_targets_in", lambda *a: chunks.append(1) or scored(*a))
    data = [_datum(list(range(5, 60))), _datum(list(range(100, 131)))]
    results = []
    for max_logits in (None, 2000):  # the test model's vocabulary is ~4k: one position a chunk
        trainer = client(max_logits)
        out = trainer.forward_backward(data).result()
        trainer.optim_step(AdamParams(learning_rate=1e-2)).result()
        after = trainer.forward(data).result()
        results.append((out.metrics["loss:sum"], after.metrics["loss:sum"],
                        [o["logprobs"].to_torch() for o in after.loss_fn_outputs]))
    # ~84 positions: 23 vocabulary columns (of ~4k) a chunk, in forward, backward and forward
    assert len(chunks) > 3 * 100
    (loss, after, logprobs), (chunked_loss, chunked_after, chunked_logprobs) = results
    assert chunked_loss == pytest.approx(loss, abs=1e-4)
    assert chunked_after == pytest.approx(after, abs=1e-3)
    for ours, reference in zip(chunked_logprobs, logprobs, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_under_bf16_autocast_chunks_match_the_whole_batch_to_bf16_precision():
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole, whole_grads = _score(model, max_logits=None)
        chunked, chunked_grads = _score(model, max_logits=300 * 7)
    torch.testing.assert_close(chunked, whole, atol=2e-2, rtol=0)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=2e-2, rtol=2e-2, msg=name)
