"""LoRA (peft) training clients: adapter-only train state, adapter snapshots, reference, merge."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from training.sdk import AdamParams, Datum, ModelInput, ServiceClient
from training.sdk.lora import LoraError, merge_adapter

from .conftest import TEST_MODEL
from .test_training_client import _datum, _same, _tokens, _train, _weights


@pytest.fixture
def lora_client(store_root, tiny_model_dir):
    service = ServiceClient(store_root, mixed_precision="no")
    return service, service.create_training_client(TEST_MODEL, lora_rank=4)


def test_only_the_adapter_trains(lora_client):
    _, client = lora_client
    trainable = [n for n, p in client.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = {n: p.detach().clone() for n, p in client.model.named_parameters()
            if not p.requires_grad}
    _train(client, [_datum(_tokens(client, "only adapters move"))], 2)
    for name, param in client.model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base[name]), name


def test_lora_train_state_holds_the_adapter_and_resumes_exactly(lora_client):
    _, client = lora_client
    datums = [_datum(_tokens(client, "exact resume of an adapter"))]
    _train(client, datums, 2)
    client.save_state("step-2").result()
    _train(client, datums, 2)
    reference = _weights(client)
    client.load_state_with_optimizer("step-2").result()
    _train(client, datums, 2)
    assert _same(_weights(client), reference)
    shard_bytes = sum(client.store.fs.du(client.store.state_dir(client.job_id, "step-2"),
                                         total=False).values())
    full_bytes = sum(p.numel() * 4 for p in client.model.parameters())
    assert shard_bytes < full_bytes / 2  # adapter + its Adam moments, not the base


def test_reference_shares_the_model_with_the_adapter_off(lora_client, tiny_model_dir):
    service, client = lora_client
    datums = [_datum(_tokens(client, "reference is the base"))]
    _train(client, datums, 3, lr=5e-2)
    reference = service.create_reference_client(TEST_MODEL, lora_rank=4)
    assert reference.model is client.model
    assert service.create_base_training_client(TEST_MODEL) is reference
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([datums[0].model_input.to_ints()])
    expected = torch.log_softmax(base(input_ids=ids).logits[0].float(), -1).gather(
        -1, datums[0].loss_fn_inputs["target_tokens"].to_torch()[:, None])[:, 0]
    got = reference.forward(datums).result().loss_fn_outputs[0]["logprobs"].to_torch()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    policy = client.forward(datums).result().loss_fn_outputs[0]["logprobs"].to_torch()
    assert not torch.allclose(policy, expected, atol=1e-3)
    with pytest.raises(RuntimeError, match="frozen reference"):
        reference.forward_backward(datums)


def test_adapter_snapshot_loads_with_peft_and_merges(lora_client, tiny_model_dir, tmp_path):
    _, client = lora_client
    _train(client, [_datum(_tokens(client, "adapter snapshot"))], 3, lr=5e-2)
    first = client.save_weights_for_sampler_ext("a")
    second = client.save_weights_for_sampler_ext("b")  # never a delta for LoRA
    for result in (first, second):
        meta = client.store.get_sampler(client.job_id, result.snapshot_name)
        assert meta.snapshot_type == "INFERENCE_LORA"
    snapshot_dir = client.store.sampler_dir(client.job_id, second.snapshot_name)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           snapshot_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = client.model(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5,
                                   rtol=0)
        merge_adapter(tiny_model_dir, snapshot_dir, tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)


def test_load_adapter_warm_starts_weights_only(lora_client, store_root, tiny_model_dir):
    _, source = lora_client
    _train(source, [_datum(_tokens(source, "warm start"))], 2, lr=5e-2)
    snapshot = source.save_weights_for_sampler_ext("warm").snapshot_name
    target = ServiceClient(store_root, mixed_precision="no").create_training_client(
        TEST_MODEL, lora_rank=4)
    target.load_adapter(source.store.sampler_dir(source.job_id, snapshot)).result()
    assert _same(_weights(target), _weights(source))
    assert target.step == 0
    full = ServiceClient(store_root, mixed_precision="no").create_training_client(TEST_MODEL)
    with pytest.raises(ValueError, match="needs a LoRA session"):
        full.load_adapter("anything")
    with pytest.raises(LoraError, match="not a PEFT adapter directory"):
        target.load_adapter(str(tiny_model_dir))


def test_bad_target_modules_are_named(store_root, tiny_model_dir):
    service = ServiceClient(store_root, mixed_precision="no")
    with pytest.raises(LoraError, match="nope_proj"):
        service.create_training_client(TEST_MODEL, lora_rank=4, lora_target_modules=["nope_proj"])


def test_reattached_lora_job_rebuilds_the_same_adapter(lora_client, store_root):
    _, client = lora_client
    _train(client, [_datum(_tokens(client, "reattach"))], 1)
    client.save_state("s").result()
    again = ServiceClient(store_root, mixed_precision="no").create_training_client(
        TEST_MODEL, lora_rank=4, job_id=client.job_id)
    again.load_state_with_optimizer("s").result()
    assert _same(_weights(again), _weights(client))
    client.optim_step  # noqa: B018 (the original stays usable)
    assert AdamParams().learning_rate > 0


def _sft_config(tmp_path, log: str, **overrides):
    import json

    from training.recipes.sft_loop import Config
    from training.utils import InfraConfig

    chats = tmp_path / "chats.jsonl"
    if not chats.exists():
        chats.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"Double {i}."},
            {"role": "assistant", "content": f"{2 * i}"}]}) + "\n" for i in range(16)))
    fields = dict(log_path=str(tmp_path / log), base_model=TEST_MODEL, dataset=str(chats),
                  batch_size=4, epochs=2, learning_rate=5e-3, lora_rank=4, dcp_save_interval=3,
                  infra=InfraConfig(storage_root=str(tmp_path / "store"), num_threads=1,
                                    mixed_precision="no"))
    fields.update(overrides)
    return Config(**fields)


def test_sft_with_lora_resumes_exactly_and_promotes_adapter_or_merged(tmp_path, tiny_model_dir):
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from training.recipes.sft_loop import main

    reference = main(_sft_config(tmp_path, "reference", output_model_id="sft-lora-adapter"))
    rolled = _sft_config(tmp_path, "rolled")
    main(rolled)
    log = Path(rolled.log_path) / "checkpoints.jsonl"
    log.write_text(log.read_text().splitlines()[0] + "\n")  # back to step 3, as after a crash
    resumed = main(_sft_config(tmp_path, "rolled", output_model_id="sft-lora-merged",
                               merge_lora_on_promote=True))

    def adapter(result):
        row = result.final_checkpoint
        store_dir = tmp_path / "store" / "jobs" / row["source_job_id"] / "samplers"
        return load_file(store_dir / row["sampler_path"] / "adapter_model.safetensors")

    expected, got = adapter(reference), adapter(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k])
                                                 for k in expected)
    adapter_model = reference.promoted_model
    assert adapter_model["checkpointType"] == "INFERENCE_LORA"
    assert json.loads((Path(adapter_model["path"]) / "adapter_config.json").read_text())["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, adapter_model["path"])
    merged = AutoModelForCausalLM.from_pretrained(resumed.promoted_model["path"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits,
                                   with_adapter(input_ids=ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("recipe_name", ["dpo_loop", "orpo_loop"])
def test_preference_recipes_train_an_adapter_and_resume_exactly(tmp_path, tiny_model_dir,
                                                                 recipe_name):
    import importlib
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from training.utils import InfraConfig

    recipe = importlib.import_module(f"training.recipes.{recipe_name}")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"{i} + {i}?", "chosen": f"{2 * i}.",
                                         "rejected": "No idea."}) + "\n" for i in range(16)))

    def config(log):
        return recipe.Config(log_path=str(tmp_path / log), base_model=TEST_MODEL,
                             dataset=str(prefs), batch_size=4, epochs=1, learning_rate=5e-3,
                             lora_rank=4, dcp_save_interval=2,
                             infra=InfraConfig(storage_root=str(tmp_path / "store"),
                                               num_threads=1, mixed_precision="no"))

    reference = recipe.main(config("reference"))
    rolled = config("rolled")
    recipe.main(rolled)
    log = Path(rolled.log_path) / "checkpoints.jsonl"
    log.write_text(log.read_text().splitlines()[0] + "\n")
    resumed = recipe.main(rolled)

    def adapter(result):
        row = result.final_checkpoint
        entry = tmp_path / "store" / "jobs" / row["source_job_id"] / "samplers" / row[
            "sampler_path"]
        assert json.loads((entry / "meta.json").read_text())["snapshot_type"] == "INFERENCE_LORA"
        return load_file(entry / "adapter_model.safetensors")

    expected, got = adapter(reference), adapter(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert any(float(v.abs().max()) > 0 for k, v in got.items() if "lora_B" in k)  # it trained


def test_deployment_hotloads_an_adapter_onto_its_base(lora_client):
    from training.sdk import DeploymentManager, SamplingParams

    service, client = lora_client
    _train(client, [_datum(_tokens(client, "serve the adapter"))], 3, lr=5e-2)
    first = client.save_weights_for_sampler_ext("serve-1")
    manager = DeploymentManager(service.store, device="cpu", engine="transformers")
    deployment = manager.create_deployment(TEST_MODEL, "lora-serve")
    manager.hotload("lora-serve", first.path)
    assert deployment.current_snapshot_identity == first.path
    prompt = [5, 6, 7, 8]
    out = deployment.sample([prompt], SamplingParams(max_tokens=5, temperature=0))[0][0]
    with torch.no_grad():
        full = torch.tensor([prompt + out.tokens])
        expected = torch.log_softmax(client.model(input_ids=full).logits[0].float(), -1)
    expected = expected[len(prompt) - 1:-1].gather(-1, torch.tensor(out.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=0)

    # A second adapter replaces the first (merged onto the pristine base, not onto the first).
    _train(client, [_datum(_tokens(client, "serve the adapter"))], 2, lr=5e-2)
    second = client.save_weights_for_sampler_ext("serve-2")
    manager.hotload("lora-serve", second.path)
    with torch.no_grad():
        engine_logits = deployment.engine.model(input_ids=torch.tensor([prompt])).logits
        policy_logits = client.model(input_ids=torch.tensor([prompt])).logits
    torch.testing.assert_close(engine_logits, policy_logits, atol=1e-4, rtol=0)


def test_lora_clients_and_references_share_one_copy_of_the_base(store_root, tiny_model_dir):
    from training.sdk import ServiceClient

    first = ServiceClient(store_root, device="cpu", mixed_precision="no") \
        .create_training_client(TEST_MODEL, lora_rank=4)
    second = ServiceClient(store_root, device="cpu", mixed_precision="no") \
        .create_training_client(TEST_MODEL, lora_rank=4)
    reference = ServiceClient(store_root, device="cpu", mixed_precision="no") \
        .create_reference_client(TEST_MODEL)

    def base(client):
        return {n: p for n, p in client.model.named_parameters() if "lora_" not in n}

    a, b = base(first), base(second)
    shared = [n for n in a if n.replace("base_model.model.", "") in
              {m.replace("base_model.model.", "") for m in b}]
    assert shared and all(a[n].data_ptr() == b[n].data_ptr() for n in shared)
    ref = dict(reference.model.named_parameters())
    embed = next(n for n in a if n.endswith("embed_tokens.weight"))
    assert ref["model.embed_tokens.weight"].data_ptr() == a[embed].data_ptr()
    # Training one adapter leaves the other's adapter and the shared base as they were.
    before = {n: p.detach().clone() for n, p in second.model.named_parameters()}
    tokens = list(range(5, 25))
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": tokens[1:]})
    for _ in range(3):
        first.forward_backward([datum]).result()
        first.optim_step(AdamParams(learning_rate=1e-2)).result()
    assert all(torch.equal(p, before[n]) for n, p in second.model.named_parameters())
    # A full train state loaded into the reference gets its own copy: the others keep theirs.
    full = ServiceClient(store_root, device="cpu", mixed_precision="no") \
        .create_training_client(TEST_MODEL)
    full.forward_backward([datum]).result()
    full.optim_step(AdamParams(learning_rate=1e-1)).result()
    full.save_state("trained").result()
    reference.load_state(f"cross_job://{full.job_id}/trained").result()
    assert torch.equal(dict(reference.model.named_parameters())["model.embed_tokens.weight"],
                       dict(full.model.named_parameters())["model.embed_tokens.weight"])
    assert all(torch.equal(p, before[n]) for n, p in second.model.named_parameters())
    tied = reference.model.lm_head.weight is reference.model.model.embed_tokens.weight
    assert tied == reference.model.config.tie_word_embeddings


def _tiny_arch(arch: str):
    import transformers

    common = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64,
                                                  num_key_value_heads=2, **common),
        "qwen2": lambda: transformers.Qwen2Config(hidden_size=32, intermediate_size=64,
                                                  num_key_value_heads=2, **common),
        "mistral": lambda: transformers.MistralConfig(hidden_size=32, intermediate_size=64,
                                                      num_key_value_heads=2, **common),
        "gemma2": lambda: transformers.Gemma2Config(hidden_size=32, intermediate_size=64,
                                                    num_key_value_heads=2, head_dim=8,
                                                    **common),
        "phi3": lambda: transformers.Phi3Config(hidden_size=32, intermediate_size=64,
                                                num_key_value_heads=4, pad_token_id=0,
                                                bos_token_id=1, eos_token_id=2, **common),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                bos_token_id=1, eos_token_id=2),
        "qwen3": lambda: transformers.Qwen3Config(hidden_size=32, intermediate_size=64,
                                                  num_key_value_heads=2, head_dim=8, **common),
        "gemma3": lambda: transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64,
                                                        num_key_value_heads=2, head_dim=8,
                                                        **common),
        # MoE: transformers 5 keeps each layer's experts as fused 3-D parameters
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=8, **common),
        "mixtral": lambda: transformers.MixtralConfig(
            hidden_size=32, intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, **common),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[arch]())


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "qwen3_moe",
         "mixtral"]


def _adapted_kinds(model) -> set[str]:
    """``attn`` / ``mlp`` for every module carrying an adapter (an MoE layer's experts: mlp)."""
    from training.sdk.lora import ATTENTION_PARTS

    kinds = set()
    for name, _ in model.named_parameters():
        if "lora_A" in name:
            parts = name.split(".lora_A")[0].split(".")
            kinds.add("attn" if any(p in ATTENTION_PARTS for p in parts) else "mlp")
    return kinds


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_adapt_attention_and_mlp_and_merge_like_peft(arch, tmp_path):
    """Every architecture's block projections are adapted by default (GPT-2's Conv1D, Phi-3's
    fused qkv_proj / gate_up_proj, MoE experts' fused 3-D weights included), and a
    deployment's merge of the saved adapter equals peft's own merge_and_unload."""
    from training.sdk.lora import (
        _block_projections,
        _expert_parameters,
        apply_lora,
        lora_targets,
        save_adapter,
    )
    from training.sdk.snapshots import merge_lora_weights

    base = _tiny_arch(arch)
    kinds = _block_projections(base)
    experts = _expert_parameters(base)
    assert bool(experts) == (arch in ("qwen3_moe", "mixtral"))
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, rank=4)
    assert _adapted_kinds(model) == {"attn", "mlp"}, arch
    if experts:  # a rank-4 adapter per expert on each fused expert weight; the router has none
        assert sum("experts" in n and "lora_A" in n for n, _ in model.named_parameters()) == 4
        assert not any(".gate.lora" in n for n, _ in model.named_parameters())
    assert set(lora_targets(_tiny_arch(arch), train_attn=False, train_unembed=False)) == {
        leaf for leaf, kind in kinds.items() if kind == "mlp"} | set(experts)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    tokens = torch.randint(0, 64, (1, 12))
    expected = model.eval()(tokens).logits  # eval: no dropout (GPT-2 has some)
    save_adapter(model, tmp_path / "adapter")
    ours = merge_lora_weights(base_weights, str(tmp_path / "adapter"), "test")
    theirs = model.merge_and_unload().state_dict()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, msg=f"{arch}: {key}")
    # The merged weights compute what the adapted model did.
    plain = _tiny_arch(arch)
    plain.load_state_dict(ours)
    torch.testing.assert_close(plain.eval()(tokens).logits, expected, atol=1e-4, rtol=1e-4)


def test_moe_experts_refuse_dropout_by_name():
    import transformers

    from training.sdk.lora import LoraError, apply_lora

    model = _tiny_arch("qwen3_moe")
    with pytest.raises(LoraError, match=r"lora_dropout=0.1 cannot apply to Qwen3MoeForCausalLM's "
                                        r"expert weights \['mlp.experts.gate_up_proj'"):
        apply_lora(model, rank=4, dropout=0.1)
    assert transformers  # the dense projections alone take dropout:
    apply_lora(_tiny_arch("qwen3_moe"), rank=4, dropout=0.1,
               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])




def test_an_moe_adapter_trains_its_experts_serves_and_promotes_merged(store_root, tmp_path):
    """Tinker's create_lora_training_client on a Qwen3-MoE model: the experts' adapters train,
    a deployment serves the adapter merged onto the base, and the promoted model is a plain
    transformers model computing the same."""
    import transformers

    from training.sdk import DeploymentManager, ModelRegistry
    from training.sdk.tiny_model import build_tiny_tokenizer

    model_dir = tmp_path / "tiny-moe"
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, head_dim=8)).save_pretrained(model_dir)
    service = ServiceClient(store_root, device="cpu", mixed_precision="no")
    client = service.create_lora_training_client(str(model_dir), rank=4, seed=0)
    experts = {n: p.detach().clone() for n, p in client.model.named_parameters()
               if "experts" in n and "lora_B" in n}
    assert len(experts) == 4  # gate_up_proj and down_proj of both layers
    tokens = [5, 9, 14, 3, 22, 41, 7, 30, 12, 6]
    _train(client, [_datum(tokens)], 3, lr=5e-2)
    assert all(not torch.equal(p, experts[n]) for n, p in client.model.named_parameters()
               if n in experts)
    snapshot = client.save_weights_for_sampler_ext("moe-1")
    from safetensors import safe_open

    adapter_file = f"{service.store.sampler_dir(client.job_id, snapshot.snapshot_name)}/" \
                   f"adapter_model.safetensors"
    with safe_open(adapter_file, "pt") as f:  # the adapter alone: no copy of the base's layers
        assert all(".lora_" in key for key in f.keys())
    manager = DeploymentManager(service.store, device="cpu", engine="transformers")
    deployment = manager.create_deployment(str(model_dir), "moe-serve")
    manager.hotload("moe-serve", snapshot.path)
    prompt = torch.tensor([tokens])
    with torch.no_grad():
        policy = client.model(input_ids=prompt).logits
        torch.testing.assert_close(deployment.engine.model(input_ids=prompt).logits, policy,
                                   atol=1e-4, rtol=0)
    registry = ModelRegistry(service.store)
    promoted = registry.promote_checkpoint(
        name=registry.checkpoint_name(client.job_id, snapshot.snapshot_name),
        output_model_id="moe-merged", merge=True)
    plain = AutoModelForCausalLM.from_pretrained(promoted["path"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=prompt).logits, policy, atol=1e-4, rtol=0)
