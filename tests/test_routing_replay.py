"""MoE routing replay (seed 004) on a tiny random Qwen3-MoE built offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

from training.sdk import AdamParams, Datum, DeploymentManager, DeploymentSampler, ModelInput
from training.sdk.routing import RoutingError, capture_routing, moe_routers, replay_routing


def _random_routers(model: torch.nn.Module) -> None:
    """Routers start at zero in some inits (every expert ties): give them real preferences."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in moe_routers(model):
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator))


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, tiny_model_dir) -> str:
    vocab = json.loads((Path(tiny_model_dir) / "config.json").read_text())["vocab_size"]
    config = Qwen3MoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                            moe_intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                            max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    _random_routers(model)
    directory = tmp_path_factory.mktemp("tiny-moe")
    model.save_pretrained(directory)
    for f in Path(tiny_model_dir).iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, directory / f.name)
    return str(directory)


def _datums(tokenizer, texts):
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(Datum(model_input=ModelInput.from_ints(ids[:-1]),
                         loss_fn_inputs={"target_tokens": ids[1:]}))
    return out


def _with_routing(datums, matrices):
    return [Datum(model_input=d.model_input,
                  loss_fn_inputs={**d.loss_fn_inputs, "routing_matrices": m})
            for d, m in zip(datums, matrices, strict=True)]


def test_training_forward_uses_the_reference_routing(store_root, tiny_moe_dir):
    from training.sdk import ServiceClient

    service = ServiceClient(store_root, device="cpu", mixed_precision="no")
    policy = service.create_training_client(tiny_moe_dir)
    reference = service.create_reference_client(tiny_moe_dir)
    datums = _datums(policy.get_tokenizer(), ["the quick brown fox jumps over the dog",
                                              "two plus two is four", "hello there"])
    ref = reference.forward(datums).result()
    matrices = [o["routing_matrices"].to_torch() for o in ref.loss_fn_outputs]
    assert [tuple(m.shape) for m in matrices] == [(d.model_input.length, 2, 2) for d in datums]
    # Same weights: replaying the reference's routing changes nothing.
    plain = policy.forward(datums).result()
    replayed = policy.forward(_with_routing(datums, matrices)).result()
    for a, b in zip(plain.loss_fn_outputs, replayed.loss_fn_outputs, strict=True):
        torch.testing.assert_close(a["logprobs"].to_torch(), b["logprobs"].to_torch())
    # Train the policy until its own routing differs from the reference's.
    for _ in range(8):
        policy.forward_backward(datums).result()
        policy.optim_step(AdamParams(learning_rate=5e-2)).result()
    drifted = policy.forward(datums).result()
    own = [o["routing_matrices"].to_torch() for o in drifted.loss_fn_outputs]
    assert any(not torch.equal(a, b) for a, b in zip(own, matrices, strict=True))
    replayed = policy.forward(_with_routing(datums, matrices)).result()
    # With replay every token went to the reference's experts, and the log-probs changed.
    for out, matrix in zip(replayed.loss_fn_outputs, matrices, strict=True):
        assert torch.equal(out["routing_matrices"].to_torch(), matrix)
    assert any(not torch.allclose(a["logprobs"].to_torch(), b["logprobs"].to_torch())
               for a, b in zip(drifted.loss_fn_outputs, replayed.loss_fn_outputs, strict=True))
    # The router still learns under replay (its gate weights come from its own logits).
    policy.forward_backward(_with_routing(datums, matrices), "cross_entropy").result()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0
               for r in moe_routers(policy.model))
    policy.optim_step(AdamParams(learning_rate=1e-3)).result()
    # Wrong shapes and partial routing are refused by name.
    with pytest.raises(ValueError, match=r"datum 0: routing_matrices has shape"):
        policy.forward(_with_routing(datums[:1], [matrices[0][:, :1]]))
    with pytest.raises(ValueError, match=r"datums \[1\] have no routing_matrices"):
        policy.forward([*_with_routing(datums[:1], matrices[:1]), datums[1]])


def test_routing_matrices_on_a_dense_model_are_refused(make_client):
    client = make_client()
    datum = Datum(model_input=ModelInput.from_ints([5, 6, 7]),
                  loss_fn_inputs={"target_tokens": [6, 7, 8],
                                  "routing_matrices": torch.zeros(3, 1, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="has no mixture-of-experts layers"):
        client.forward([datum])


def test_deployment_sampler_returns_the_routing_training_replays(store_root, tiny_moe_dir):
    from training.sdk import ServiceClient

    service = ServiceClient(store_root, device="cpu", mixed_precision="no")
    client = service.create_training_client(tiny_moe_dir)
    manager = DeploymentManager(service.store, device="cpu", engine="transformers")
    manager.create_deployment(tiny_moe_dir, "moe")
    sampler = DeploymentSampler(manager, "moe")
    completions = sampler.sample_with_tokens_sync([{"role": "user", "content": "hi"}], n=2,
                                                  max_tokens=5, seed=1,
                                                  include_routing_matrix=True)
    for completion in completions:
        full = completion.full_tokens
        assert tuple(completion.routing_matrix.shape) == (len(full), 2, 2)
        datum = Datum(model_input=ModelInput.from_ints(full[:-1]),
                      loss_fn_inputs={"target_tokens": full[1:]})
        trained = client.forward([datum]).result().loss_fn_outputs[0]["routing_matrices"]
        assert torch.equal(trained.to_torch(), completion.routing_matrix[:-1])


def test_mixtral_router_replays_its_own_choice_exactly():
    config = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    _random_routers(model)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad(), capture_routing(model) as captured:
        plain = model(input_ids=ids).logits
    with torch.no_grad(), replay_routing(model, captured):
        replayed = model(input_ids=ids).logits
    assert torch.equal(plain, replayed)
    flipped = [c.flip(-1).roll(1, dims=0) for c in captured]
    with torch.no_grad(), replay_routing(model, flipped), capture_routing(model) as seen:
        model(input_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(seen, flipped, strict=True))
    with pytest.raises(RoutingError, match="names expert 9"):
        with replay_routing(model, [torch.full((12, 2), 9)] * 2):
            pass
