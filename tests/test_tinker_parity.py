"""Calls written the way Tinker's docs and the seeds write them, run against the local client.

Each test is one documented call (or a family of them) as a user would paste it: plain lists in
``loss_fn_inputs``, the official ``tinker`` package's types, the built-in RL losses with
``loss_fn_config``. docs/porting.md points at these tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch

from training.sdk import AdamParams, Datum, GradAccNormalization, ModelInput, TensorData
from training.sdk.losses import BUILTIN_LOSSES


def _tokens(client, text: str) -> list[int]:
    return client.get_tokenizer()(text, add_special_tokens=False)["input_ids"]


def _grads(client) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in client.model.named_parameters()
            if p.grad is not None}


def _rl_inputs(n: int, seed: int = 0) -> dict[str, list[float]]:
    """Sampler logprobs near the model's and advantages of both signs (0 on a 'prompt')."""
    rng = np.random.default_rng(seed)
    advantages = [0.0, 0.0] + [float(a) for a in rng.choice([-1.5, 0.5, 2.0], n - 2)]
    return {"logprobs": [float(x) for x in -rng.uniform(4.0, 9.0, n)],
            "advantages": advantages}


def test_loss_fn_inputs_accept_plain_lists_and_numpy_with_tinker_dtypes(make_client):
    client = make_client()
    ids = _tokens(client, "The capital of France is Paris.")
    # As the README and Tinker's docs write it: plain lists.
    listed = Datum(model_input=ModelInput.from_ints(ids[:-1]),
                   loss_fn_inputs={"target_tokens": ids[1:],
                                   "weights": [1.0] * (len(ids) - 1)})
    assert listed.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert listed.loss_fn_inputs["weights"].dtype == "float32"
    # numpy of other dtypes is coerced by key: int32 targets, float64 weights.
    arrays = Datum(model_input=ModelInput.from_ints(ids[:-1]),
                   loss_fn_inputs={"target_tokens": np.array(ids[1:], dtype=np.int32),
                                   "weights": np.ones(len(ids) - 1, dtype=np.float64),
                                   "advantages": [1, 0, 2] + [0] * (len(ids) - 4)})
    assert arrays.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert arrays.loss_fn_inputs["weights"].dtype == "float32"
    assert arrays.loss_fn_inputs["advantages"].dtype == "float32"  # ints given, float kept
    a = client.forward([listed]).result()
    b = client.forward([Datum(model_input=arrays.model_input, loss_fn_inputs={
        k: arrays.loss_fn_inputs[k] for k in ("target_tokens", "weights")})]).result()
    assert a.metrics == b.metrics
    with pytest.raises(ValueError, match=r"loss_fn_inputs\['weights'\] must be a rectangular"):
        Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"weights": [[1.0], []]})
    with pytest.raises(TypeError, match=r"loss_fn_inputs\['weights'\] must be TensorData"):
        Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"weights": "1 1"})


def test_a_misspelled_loss_fn_inputs_key_is_refused_by_name(make_client):
    client = make_client()
    ids = _tokens(client, "some words here and there")
    datum = Datum(model_input=ModelInput.from_ints(ids[:-1]),
                  loss_fn_inputs={"target_tokens": ids[1:], "wieghts": [0.0] * (len(ids) - 1)})
    with pytest.raises(ValueError, match=r"datum 0: loss_fn_inputs key\(s\) \['wieghts'\] are "
                                         r"not read by loss 'cross_entropy'"):
        client.forward_backward([datum], "cross_entropy")
    assert not client._pending_backward  # refused before any compute
    with pytest.raises(ValueError, match=r"needs loss_fn_inputs \['logprobs', 'advantages'\]"):
        client.forward_backward([Datum(model_input=datum.model_input, loss_fn_inputs={
            "target_tokens": ids[1:]})], "ppo")
    with pytest.raises(ValueError, match=r"loss_fn_config key 'clip_ratio' is not used by loss "
                                         r"'ppo'"):
        client.forward([Datum(model_input=datum.model_input, loss_fn_inputs={
            "target_tokens": ids[1:], **_rl_inputs(len(ids) - 1)})], "ppo",
            loss_fn_config={"clip_ratio": 0.2})
    # A custom loss gets every key, misspelled or not.
    seen = {}

    def loss_fn(data, logprobs):
        seen.update(data[0].loss_fn_inputs)
        return -logprobs[0].sum(), {}

    client.forward_backward_custom([datum], loss_fn).result()
    assert "wieghts" in seen


def test_official_tinker_types_are_accepted_everywhere(make_client):
    client = make_client()
    ids = _tokens(client, "The quick brown fox jumps over the lazy dog")
    theirs = tinker.Datum(model_input=tinker.ModelInput.from_ints(ids[:-1]),
                          loss_fn_inputs={"target_tokens": ids[1:],
                                          "weights": [1.0] * (len(ids) - 1)})
    ours = Datum(model_input=ModelInput.from_ints(ids[:-1]),
                 loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    assert client.forward([theirs]).result().metrics == client.forward([ours]).result().metrics
    fwd = client.forward_backward([theirs], "cross_entropy").result()
    # As the seeds write it: tinker.AdamParams with its own field names.
    optim = client.optim_step(tinker.AdamParams(learning_rate=1e-3, beta1=0.9, beta2=0.999,
                                                eps=1e-8, weight_decay=0.01),
                              GradAccNormalization.NUM_LOSS_TOKENS).result()
    assert optim.metrics["learning_rate"] == pytest.approx(1e-3)
    assert client._optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert client._optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.01)
    assert fwd.metrics["num_loss_tokens"] == len(ids) - 1
    # tinker.TensorData values inside our Datum, and a tinker Datum in a custom loss.
    mixed = Datum(model_input=tinker.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={
        "target_tokens": tinker.TensorData.from_numpy(np.array(ids[1:]))})
    assert mixed.model_input.to_ints() == ids[:-1]
    out = client.forward_backward_custom([theirs], lambda d, lp: (-lp[0].sum(), {})).result()
    assert out.metrics == {}


def _manual_loss(name: str, lp: torch.Tensor, q: torch.Tensor, a: torch.Tensor,
                 config: dict[str, float]) -> torch.Tensor:
    """Tinker's documented formulas, written out again from its docs."""
    ratio = torch.exp(lp - q)
    if name == "importance_sampling":
        return -(ratio * a).sum()
    if name == "ppo":
        clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
        return -torch.min(ratio * a, clipped * a).sum()
    if name == "cispo":
        weight = torch.clamp(ratio.detach(), config["clip_low_threshold"],
                             config["clip_high_threshold"])
        return -(weight * lp * a).sum()
    if name == "dro":
        return -(lp * a - 0.5 * config["beta"] * (lp - q) ** 2).sum()
    assert name == "gspo"
    mask = a != 0
    log_ratio = (lp.detach() - q)[mask].mean()
    seq_ratio = torch.exp(log_ratio + lp - lp.detach())
    clipped = torch.clamp(seq_ratio, config["clip_low_threshold"],
                          config["clip_high_threshold"])
    return -torch.min(seq_ratio * a, clipped * a).sum()


@pytest.mark.parametrize(("loss_fn", "loss_fn_config"), [
    ("importance_sampling", None),
    ("ppo", None),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", None),
    ("dro", {"beta": 0.3}),
    ("gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}),
])
def test_builtin_rl_losses_follow_tinkers_formulas(make_client, loss_fn, loss_fn_config):
    builtin, custom = make_client(), make_client()
    texts = ["the quick brown fox jumps", "over the lazy dog, twice and then once more"]
    datums = []
    for i, text in enumerate(texts):
        ids = _tokens(builtin, text)
        datums.append(Datum(model_input=ModelInput.from_ints(ids[:-1]), loss_fn_inputs={
            "target_tokens": ids[1:], **_rl_inputs(len(ids) - 1, seed=i)}))
    out = builtin.forward_backward(datums, loss_fn, loss_fn_config).result()
    config = {**BUILTIN_LOSSES[loss_fn].config, **(loss_fn_config or {})}

    def manual(data, logprobs):
        total = sum(_manual_loss(loss_fn, lp, d.loss_fn_inputs["logprobs"].to_torch(),
                                 d.loss_fn_inputs["advantages"].to_torch(), config)
                    for d, lp in zip(data, logprobs, strict=True))
        return total, {"loss": float(total.detach())}

    ref = custom.forward_backward_custom(datums, manual).result()
    assert out.metrics["loss:sum"] == pytest.approx(ref.metrics["loss"], rel=1e-5, abs=1e-5)
    assert out.loss_fn_output_type == loss_fn
    assert out.metrics["num_loss_tokens"] == sum(
        int((d.loss_fn_inputs["advantages"].to_torch() != 0).sum()) for d in datums)
    for (name, g), g_ref in zip(_grads(builtin).items(), _grads(custom).values(), strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4, msg=name)
    for a, b in zip(out.loss_fn_outputs, ref.loss_fn_outputs, strict=True):
        torch.testing.assert_close(a["logprobs"].to_torch(), b["logprobs"].to_torch())


def test_ppo_clip_thresholds_change_the_loss_and_may_come_per_datum(make_client):
    client = make_client()
    ids = _tokens(client, "jumps over the lazy dog, twice and then once more")
    inputs = {"target_tokens": ids[1:], **_rl_inputs(len(ids) - 1)}
    datum = Datum(model_input=ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs)
    wide = client.forward([datum], "ppo", {"clip_low_threshold": 0.0,
                                           "clip_high_threshold": 1e9}).result()
    unclipped = client.forward([datum], "importance_sampling").result()
    tight = client.forward([datum], "ppo", {"clip_low_threshold": 0.99,
                                            "clip_high_threshold": 1.01}).result()
    assert wide.metrics["loss:sum"] == pytest.approx(unclipped.metrics["loss:sum"], rel=1e-6)
    assert tight.metrics["loss:sum"] != pytest.approx(wide.metrics["loss:sum"], rel=1e-3)
    per_datum = Datum(model_input=datum.model_input, loss_fn_inputs={
        **inputs, "clip_low_threshold": [0.99], "clip_high_threshold": [1.01]})
    assert client.forward([per_datum], "ppo").result().metrics["loss:sum"] == \
        pytest.approx(tight.metrics["loss:sum"], rel=1e-6)


def test_tensor_data_round_trips_keep_tinker_dtypes():
    data = TensorData.from_numpy(np.arange(6, dtype=np.float64).reshape(2, 3))
    datum = Datum(model_input=ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"logprobs": data})
    assert datum.loss_fn_inputs["logprobs"].dtype == "float32"
    assert datum.loss_fn_inputs["logprobs"].shape == [2, 3]
    assert AdamParams().beta2 == tinker.AdamParams().beta2  # same defaults as Tinker
    assert AdamParams().eps == tinker.AdamParams().eps


# ---------------------------------------------------------------- Tinker's client names
def _service(store_root: str):
    from training.sdk import ServiceClient

    return ServiceClient(store_root, mixed_precision="no", device="cpu")


def _sft_datum(tokenizer, text: str) -> Datum:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Datum(model_input=ModelInput.from_ints(ids[:-1]),
                 loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


def test_create_lora_training_client_with_tinkers_switches(store_root, tiny_model_dir):
    from .conftest import TEST_MODEL

    service = _service(store_root)
    # Tinker returns a future of the client: .result() and the client itself both work.
    client = service.create_lora_training_client(base_model=TEST_MODEL, rank=4, seed=7,
                                                  train_mlp=False, train_unembed=False).result()
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in client.model.named_parameters()
               if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    info = client.get_info()
    assert (info.model_id, info.is_lora, info.lora_rank) == (client.job_id, True, 4)
    assert info.model_data.model_name == TEST_MODEL and info.model_data.tokenizer_id == TEST_MODEL
    # The same seed draws the same adapter; another seed another one.
    again = _service(store_root).create_lora_training_client(
        TEST_MODEL, rank=4, seed=7, train_mlp=False, train_unembed=False)
    other = _service(store_root).create_lora_training_client(
        TEST_MODEL, rank=4, seed=8, train_mlp=False, train_unembed=False)
    a = {n: p for n, p in client.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in again.model.named_parameters() if p.requires_grad}
    c = {n: p for n, p in other.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    full = _service(store_root).create_lora_training_client(TEST_MODEL, rank=2)
    targets = {n.split(".lora_A")[0].rsplit(".", 1)[-1]
               for n, _ in full.model.named_parameters() if "lora_A" in n}
    # The test model ties lm_head to the embedding: no separate output layer to adapt.
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"}


def test_training_client_from_state_weights_only_vs_with_optimizer(store_root, tiny_model_dir):
    from .conftest import TEST_MODEL

    service = _service(store_root)
    client = service.create_training_client(TEST_MODEL)
    datum = _sft_datum(client.get_tokenizer(), "the quick brown fox jumps over the lazy dog")
    for _ in range(2):
        client.forward_backward([datum]).result()
        client.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    saved = client.save_state("step-2", user_metadata={"note": "two steps"}).result()
    tinker_path = f"tinker://{client.job_id}/weights/step-2"
    weights_only = _service(store_root).create_training_client_from_state(tinker_path)
    with_optim = _service(store_root).create_training_client_from_state_with_optimizer(saved.path)
    assert weights_only.job_id != client.job_id  # a new run, as in Tinker
    for other in (weights_only, with_optim):
        assert all(torch.equal(p, q) for p, q in zip(client.model.parameters(),
                                                     other.model.parameters(), strict=True))
    assert (weights_only.step, weights_only._optimizer) == (0, None)
    assert with_optim.step == 2 and with_optim._optimizer is not None
    # One more step from each: only the restored optimizer continues exactly.
    for c in (client, weights_only, with_optim):
        c.forward_backward([datum]).result()
        c.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    same = [torch.equal(p, q) for p, q in zip(client.model.parameters(),
                                              with_optim.model.parameters(), strict=True)]
    differ = [torch.equal(p, q) for p, q in zip(client.model.parameters(),
                                                weights_only.model.parameters(), strict=True)]
    assert all(same) and not all(differ)
    with pytest.raises(ValueError, match="sampler snapshot, not a train state"):
        _service(store_root).create_training_client_from_state(
            f"tinker://{client.job_id}/sampler_weights/x")


def test_rest_client_lists_runs_and_checkpoints_with_user_metadata(store_root, tiny_model_dir):
    from .conftest import TEST_MODEL

    service = _service(store_root)
    client = service.create_training_client(TEST_MODEL, user_metadata={"team": "a"})
    datum = _sft_datum(client.get_tokenizer(), "some words to train on")
    client.forward_backward([datum]).result()
    client.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
    client.save_state("step-1", user_metadata={"stage": "sft"}).result()
    sampler = client.save_weights_for_sampler("step-1").result()
    rest = service.create_rest_client()
    run = rest.get_training_run(client.job_id).result()
    assert (run.training_run_id, run.base_model, run.is_lora) == (client.job_id, TEST_MODEL,
                                                                   False)
    assert run.user_metadata == {"team": "a"}
    assert run.last_checkpoint.tinker_path == f"tinker://{client.job_id}/weights/step-1"
    assert run.last_checkpoint.user_metadata == {"stage": "sft"}
    assert run.last_sampler_checkpoint.checkpoint_type == "sampler"
    listed = rest.list_checkpoints(client.job_id).result().checkpoints
    assert [c.checkpoint_type for c in listed] == ["training", "sampler"]
    by_path = rest.get_training_run_by_tinker_path(listed[1].tinker_path).result()
    assert by_path.training_run_id == client.job_id
    runs = rest.list_training_runs(limit=10).result()
    assert client.job_id in [r.training_run_id for r in runs.training_runs]
    assert runs.cursor.total_count >= 1
    # The sampler tinker:// path samples like SaveSamplerResult.path does.
    sampling = client.create_sampling_client(listed[1].tinker_path)
    assert sampling.get_base_model() == TEST_MODEL
    rest.delete_checkpoint(client.job_id, "weights/step-1").result()
    assert [c.checkpoint_type for c in rest.list_checkpoints(client.job_id).result().checkpoints] \
        == ["sampler"]
    with pytest.raises(KeyError, match="no train state 'step-1'"):
        rest.delete_checkpoint(client.job_id, "weights/step-1")
    with pytest.raises(ValueError, match="invalid run id"):
        rest.get_training_run_by_tinker_path("tinker://../weights/x")
    assert sampler.path.startswith("sampler://")
    names = [m.model_name for m in service.get_server_capabilities().supported_models]
    assert TEST_MODEL in names and "homefire/tiny-qwen3" in names


def test_sampling_client_compute_logprobs_and_topk_match_the_trainer(store_root, tiny_model_dir):
    from .conftest import TEST_MODEL

    service = _service(store_root)
    client = service.create_training_client(TEST_MODEL)
    tokenizer = client.get_tokenizer()
    ids = tokenizer("the quick brown fox jumps", add_special_tokens=False)["input_ids"]
    sampler = client.save_weights_and_get_sampling_client()
    prompt = tinker.ModelInput.from_ints(ids)
    logprobs = sampler.compute_logprobs(prompt).result()
    assert logprobs[0] is None and len(logprobs) == len(ids)
    trained = client.forward([Datum(model_input=ModelInput.from_ints(ids[:-1]),
                                    loss_fn_inputs={"target_tokens": ids[1:]})]).result()
    np.testing.assert_allclose(logprobs[1:], trained.loss_fn_outputs[0]["logprobs"].tolist(),
                               atol=1e-4)
    out = sampler.sample(prompt, num_samples=2, sampling_params=tinker.SamplingParams(
        max_tokens=4, temperature=1.0, seed=3), topk_sample_logprobs=3).result()
    for seq in out.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens)
        for (token, lp), top in zip(zip(seq.tokens, seq.logprobs, strict=True),
                                    seq.topk_logprobs, strict=True):
            assert len(top) == 3 and top[0][1] >= top[-1][1]
            assert lp <= top[0][1] + 1e-4  # nothing beats the most likely token
            if token in [t for t, _ in top]:
                assert dict(top)[token] == pytest.approx(lp, abs=1e-4)


def test_async_variants_return_awaitable_futures(store_root, tiny_model_dir):
    import asyncio

    from .conftest import TEST_MODEL

    async def run() -> tuple[float, float, list]:
        service = _service(store_root)
        client = await service.create_lora_training_client(TEST_MODEL, rank=2)
        datum = _sft_datum(client.get_tokenizer(), "the quick brown fox jumps")
        fwd_future = await client.forward_backward_async([datum], loss_fn="cross_entropy")
        optim_future = await client.optim_step_async(tinker.AdamParams(learning_rate=1e-3))
        fwd = await fwd_future.result_async()
        optim = await optim_future
        sampler = await client.save_weights_and_get_sampling_client_async()
        logprobs = await (await sampler.compute_logprobs_async(
            tinker.ModelInput.from_ints([5, 6, 7])))
        return fwd.metrics["loss:sum"], optim.metrics["step"], logprobs

    loss, step, logprobs = asyncio.run(run())
    assert loss > 0 and step == 1 and logprobs[0] is None and len(logprobs) == 3


def test_lora_targets_include_the_output_layer_of_an_untied_model():
    from transformers import AutoModelForCausalLM, Qwen3Config

    from training.sdk.lora import LoraError, lora_targets

    config = Qwen3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=64,
                         vocab_size=100, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert "lm_head" in lora_targets(model)
    assert lora_targets(model, train_attn=False, train_mlp=False) == ["lm_head"]
    assert lora_targets(model, train_unembed=False) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(LoraError, match="would train nothing"):
        lora_targets(model, train_attn=False, train_mlp=False, train_unembed=False)


def test_from_config_metadata_hosted_fields_and_misspellings(store_root, tiny_model_dir):
    from training.sdk import ServiceClient

    from .conftest import TEST_MODEL

    # The seed's managed config, hosted-only fields included, is accepted as written.
    service = ServiceClient.from_config(
        api_key="<FIREWORKS_API_KEY>", base_url="https://api.fireworks.ai",
        base_model=TEST_MODEL, tokenizer_model=None, lora_rank=0,
        training_shape_id="accounts/fireworks/trainingShapes/qwen3-8b-128k-h200",
        reference_training_shape_id=None, deployment_shape=None, trainer_replica_count=None,
        inference_url=None, deployment_id="research-serving", learning_rate=1e-5,
        replica_count=1, cleanup_trainer_on_close=True,
        cleanup_reference_trainer_on_close=True, cleanup_deployment_on_close="scale_to_zero",
        storage_root=store_root, device="cpu", mixed_precision="no")
    assert service.max_context_length == 2048
    policy = service.create_training_client(base_model=TEST_MODEL, lora_rank=0)
    assert service.trainer_job_id == policy.job_id
    assert service.reference_trainer_job_id is None  # no reference yet
    reference = service.create_reference_client(TEST_MODEL)
    assert service.reference_trainer_job_id == reference.job_id != policy.job_id
    # Another process reattaches the same reference trainer by id.
    again = ServiceClient.from_config(TEST_MODEL, storage_root=store_root, device="cpu",
                                      reference_trainer_job_id=reference.job_id)
    assert again.create_reference_client(TEST_MODEL).job_id == reference.job_id
    assert again.reference_trainer_job_id == reference.job_id
    with pytest.raises(TypeError, match="trainer_job_idd"):
        ServiceClient.from_config(TEST_MODEL, trainer_job_idd="x", storage_root=store_root)
    # A LoRA policy's reference shares its model: no separate reference trainer.
    lora = ServiceClient(store_root, device="cpu", mixed_precision="no")
    lora.create_training_client(TEST_MODEL, lora_rank=2)
    lora.create_reference_client(TEST_MODEL, lora_rank=2)
    assert lora.reference_trainer_job_id is None


def test_weight_syncer_hotload_of_an_unknown_snapshot_returns_false(store_root, tiny_model_dir):
    from training.sdk import DeploymentManager, WeightSyncer

    from .conftest import TEST_MODEL

    service = _service(store_root)
    client = service.create_training_client(TEST_MODEL)
    manager = DeploymentManager(service.store, device="cpu", engine="transformers")
    manager.create_deployment(TEST_MODEL, "serve")
    syncer = WeightSyncer(policy_client=client, deploy_mgr=manager, deployment_id="serve",
                          base_model=TEST_MODEL)
    served = syncer.save_and_hotload("step-0")
    for unknown in ("no-such-snapshot", f"sampler://{client.job_id}/nope",
                    "tinker://nojob/sampler_weights/x"):
        assert syncer.hotload(unknown) is False
        assert "no sampler snapshot" in str(syncer.last_hotload_error) or \
            "no trainer job" in str(syncer.last_hotload_error)
    assert syncer.check_deployment_state().endswith(served)  # still serving what it had


# ---------------------------------------------------------------- docs/porting.md
_PORTING = __import__("pathlib").Path(__file__).resolve().parent.parent / "docs" / "porting.md"


def test_porting_example_runs(store_root, tiny_model_dir, monkeypatch, capsys):
    import re

    monkeypatch.setenv("HOMEFIRE_STORAGE_ROOT", store_root)
    blocks = re.findall(r"```python\n(.*?)```", _PORTING.read_text(), flags=re.S)
    assert blocks, "docs/porting.md has no python example"
    for block in blocks:
        exec(compile(block, str(_PORTING), "exec"), {"__name__": "__porting__"})
    printed = capsys.readouterr().out
    assert "tinker://" in printed and "/weights/step-2" in printed


def test_porting_table_names_real_tests():
    import re

    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", _PORTING.read_text())
    assert len(named) >= 25
    root = _PORTING.parent.parent
    for path, name in named:
        assert re.search(rf"^def {name}\(", (root / path).read_text(), flags=re.M), \
            f"docs/porting.md names {path}::{name}, which does not exist"
