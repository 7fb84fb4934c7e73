"""Deployments, hotload, sampling clients, WeightSyncer and the managed service client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from training.sdk import (
    AdamParams,
    Datum,
    DeltaReferenceMismatchError,
    DeploymentError,
    DeploymentManager,
    DeploymentNotFoundError,
    DeploymentNotReadyError,
    HotloadError,
    ModelInput,
    SamplingParams,
    ServiceClient,
    WeightSyncer,
)
from training.sdk.deployments import HotloadTimeoutError, vllm_available
from training.sdk.snapshots import DELTA_DATA_FILE, read_delta_manifest

from .conftest import TEST_MODEL

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]


def _step(client, lr: float = 1e-2) -> None:
    tokens = list(range(3, 19))
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:])})
    client.forward_backward([datum]).result()
    client.optim_step(AdamParams(learning_rate=lr)).result()


@pytest.fixture
def setup(store_root, tiny_model_dir):
    """A policy client (bf16 snapshots) and a deployment of its base model."""
    service = ServiceClient(store_root, mixed_precision="no", device="cpu",
                            sampler_dtype="bfloat16")
    client = service.create_training_client(TEST_MODEL)
    manager = DeploymentManager(service.store, device="cpu", engine="transformers")
    deployment = manager.create_deployment(TEST_MODEL, "serve")
    return client, manager, deployment


def _greedy(deployment, prompts=PROMPTS, max_tokens: int = 6) -> list[list[int]]:
    out = deployment.sample(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    return [seqs[0].tokens for seqs in out]


def _engine_weights(deployment) -> dict[str, torch.Tensor]:
    return deployment.engine.model.state_dict()


def _assert_serves(deployment, client_weights: dict[str, torch.Tensor]) -> None:
    engine = _engine_weights(deployment)
    for name, tensor in client_weights.items():
        # The engine computes in fp32: bf16 weights upcast exactly.
        assert torch.equal(engine[name], tensor.float()), name


def _snapshot_of(client) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.bfloat16) for k, v in client.model.state_dict().items()
            if k != "lm_head.weight"}


def test_hotload_base_then_deltas_serves_the_trainer_weights(setup) -> None:
    client, manager, deployment = setup
    before = _greedy(deployment)
    base = client.save_weights_for_sampler_ext("s0")
    manager.hotload("serve", base.path)
    _assert_serves(deployment, _snapshot_of(client))
    for i in (1, 2):
        _step(client)
        delta = client.save_weights_for_sampler_ext(f"s{i}")
        assert manager.hotload("serve", delta.snapshot_name,
                               default_job_id=client.job_id) == delta.path
        assert manager.current_snapshot_identity("serve") == delta.path
        _assert_serves(deployment, _snapshot_of(client))
        held = deployment.held_weights()
        assert all(torch.equal(held[k], v) for k, v in _snapshot_of(client).items())
    assert _greedy(deployment) != before  # two lr-1e-2 steps change the greedy answer
    assert deployment.stats.hotloads == 3 and deployment.stats.prompt_cache_resets == 3


def test_mismatched_delta_is_refused_and_the_old_weights_keep_serving(setup) -> None:
    client, manager, deployment = setup
    base = client.save_weights_for_sampler_ext("s0")
    manager.hotload("serve", base.path)
    answer = _greedy(deployment)
    _step(client)
    skipped = client.save_weights_for_sampler_ext("s1")  # saved, never hot-loaded
    _step(client)
    delta = client.save_weights_for_sampler_ext("s2")
    with pytest.raises(DeltaReferenceMismatchError) as excinfo:
        manager.hotload("serve", delta.path)
    message = str(excinfo.value)
    assert f"applies to {skipped.path}" in message and f"holds {base.path}" in message
    assert "keeps serving" in message
    assert manager.current_snapshot_identity("serve") == base.path
    assert _greedy(deployment) == answer
    assert deployment.stats.refused_hotloads == 1
    # sync walks the chain back to what the deployment holds and loads forward.
    assert manager.sync("serve", delta.path) == [skipped.path, delta.path]
    _assert_serves(deployment, _snapshot_of(client))
    assert manager.sync("serve", delta.path) == []


def test_delta_on_a_fresh_deployment_is_refused(setup) -> None:
    client, manager, deployment = setup
    client.save_weights_for_sampler_ext("s0")
    delta = client.save_weights_for_sampler_ext("s1")
    with pytest.raises(DeltaReferenceMismatchError, match="holds the base model weights"):
        manager.hotload("serve", delta.path)
    assert deployment.current_snapshot_identity is None


def test_corrupt_delta_is_refused_and_the_old_weights_keep_serving(setup) -> None:
    client, manager, deployment = setup
    base = client.save_weights_for_sampler_ext("s0")
    manager.hotload("serve", base.path)
    answer = _greedy(deployment)
    served = {k: v.clone() for k, v in _engine_weights(deployment).items()}
    _step(client)
    delta = client.save_weights_for_sampler_ext("s1")
    data = Path(client.store.sampler_dir(client.job_id, delta.snapshot_name), DELTA_DATA_FILE)
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(HotloadError, match=rf"refused, it keeps serving {base.path}"):
        manager.hotload("serve", delta.path)
    assert manager.current_snapshot_identity("serve") == base.path
    assert all(torch.equal(v, served[k]) for k, v in _engine_weights(deployment).items())
    assert _greedy(deployment) == answer


def test_small_step_delta_skips_unchanged_tensors_and_corruption_is_refused(setup) -> None:
    client, manager, deployment = setup
    base = client.save_weights_for_sampler_ext("s0")
    manager.hotload("serve", base.path)
    before = deployment.held_weights()
    _step(client, lr=1e-5)  # norm weights (1.0) move by 1e-5: the same bf16 value
    delta = client.save_weights_for_sampler_ext("s1")
    entry_dir = Path(client.store.sampler_dir(client.job_id, delta.snapshot_name))
    tensors = read_delta_manifest(str(entry_dir)).tensors
    unchanged = {k for k, e in tensors.items() if e["encoding"] == "unchanged"}
    assert "model.norm.weight" in unchanged
    assert any(e["encoding"] == "xor-symbols" for e in tensors.values())
    good = (entry_dir / DELTA_DATA_FILE).read_bytes()
    blob = bytearray(good)
    blob[len(blob) // 3] ^= 0x10
    (entry_dir / DELTA_DATA_FILE).write_bytes(bytes(blob))
    served = {k: v.clone() for k, v in _engine_weights(deployment).items()}
    with pytest.raises(HotloadError, match=rf"refused, it keeps serving {base.path}"):
        manager.hotload("serve", delta.path)
    assert all(torch.equal(v, served[k]) for k, v in _engine_weights(deployment).items())
    assert deployment.held_weights() is before
    (entry_dir / DELTA_DATA_FILE).write_bytes(good)
    loaded: list[str] = []
    load_weights = deployment.engine.load_weights
    deployment.engine.load_weights = lambda weights: (loaded.extend(weights),
                                                      load_weights(weights))
    manager.hotload("serve", delta.path)
    assert set(loaded) == set(tensors) - unchanged  # the engine already has the others
    _assert_serves(deployment, _snapshot_of(client))
    held = deployment.held_weights()
    assert all(held[k] is before[k] for k in unchanged)


def test_hotload_of_another_base_model_is_refused(setup, store_root) -> None:
    client, manager, _ = setup
    base = client.save_weights_for_sampler_ext("s0")
    other = manager.create_deployment("homefire/tiny-qwen3", "other")
    with pytest.raises(HotloadError, match="was trained from 'homefire/tiny-qwen3-test'"):
        manager.hotload("other", base.path)
    assert other.current_snapshot_identity is None


def test_sample_logprobs_equal_a_forward_pass(setup) -> None:
    client, _, deployment = setup
    out = deployment.sample(PROMPTS, SamplingParams(max_tokens=6, seed=0), num_samples=2)
    assert [len(seqs) for seqs in out] == [2, 2]
    model = deployment.engine.model
    with torch.no_grad():
        for prompt, seqs in zip(PROMPTS, out, strict=True):
            for seq in seqs:
                full = torch.tensor([prompt + seq.tokens])
                logprobs = torch.log_softmax(model(full).logits[0].float(), -1)
                expected = logprobs[len(prompt) - 1:-1].gather(
                    -1, torch.tensor(seq.tokens)[:, None])[:, 0]
                # Left padding and the KV cache must not change the numbers.
                torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=1e-4,
                                           rtol=0)


def test_seeded_sampling_is_reproducible(setup) -> None:
    _, _, deployment = setup
    params = SamplingParams(max_tokens=8, seed=123)
    first = deployment.sample(PROMPTS, params, num_samples=3)
    assert deployment.sample(PROMPTS, params, num_samples=3) == first
    other = deployment.sample(PROMPTS, SamplingParams(max_tokens=8, seed=124), num_samples=3)
    assert other != first
    rows = [s.tokens for seqs in first for s in seqs]
    assert len({tuple(r) for r in rows}) > 1  # the samples of one batch differ


def test_stop_tokens_and_finish_reasons(setup) -> None:
    _, _, deployment = setup
    tokens = _greedy(deployment, PROMPTS[:1], max_tokens=8)[0]
    full = deployment.sample(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0))[0][0]
    assert full.stop_reason == "length" and len(full.tokens) == 8
    stop = tokens[3]
    cut = deployment.sample(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0,
                                                        stop=[stop]))[0][0]
    assert cut.stop_reason == "stop"
    assert cut.tokens == tokens[:tokens.index(stop) + 1]
    assert cut.logprobs == pytest.approx(full.logprobs[:len(cut.tokens)], abs=1e-5)


def test_manager_lifecycle(setup) -> None:
    client, manager, deployment = setup
    assert manager.create_or_get(TEST_MODEL, "serve") is deployment
    with pytest.raises(DeploymentError, match="already exists"):
        manager.create_deployment(TEST_MODEL, "serve")
    with pytest.raises(DeploymentError, match="serves 'homefire/tiny-qwen3-test'"):
        manager.create_or_get("homefire/tiny-qwen3", "serve")
    base = client.save_weights_for_sampler_ext("s0")
    manager.hotload("serve", base.path)
    manager.scale_to_zero("serve")
    assert deployment.state == "SCALED_TO_ZERO" and not manager.is_hotload_ready("serve")
    assert deployment.current_snapshot_identity is None
    with pytest.raises(DeploymentNotReadyError, match=r"scaled to zero.*scale\('serve', 1\)"):
        deployment.sample(PROMPTS, SamplingParams(max_tokens=2))
    with pytest.raises(HotloadTimeoutError, match="not ready for a hotload within 0.05 s"):
        manager.wait_for_hotload_ready("serve", timeout_s=0.05, poll_interval_s=0.01)
    manager.scale("serve", 1)
    manager.wait_for_hotload_ready("serve", timeout_s=1, poll_interval_s=0.01)
    assert deployment.ready and len(_greedy(deployment)) == 2
    manager.delete("serve")
    assert manager.list_deployments() == []
    with pytest.raises(DeploymentNotFoundError, match="no deployment 'serve'"):
        manager.get("serve")


def test_weight_syncer_base_then_deltas_and_recovery(setup) -> None:
    client, manager, deployment = setup
    syncer = WeightSyncer(policy_client=client, deploy_mgr=manager, deployment_id="serve",
                          base_model=TEST_MODEL, hotload_timeout=30)
    names = []
    for step in range(3):
        _step(client)
        names.append(syncer.save_and_hotload(f"step-{step:05d}"))
        assert syncer.check_deployment_state() == f"sampler://{client.job_id}/{names[-1]}"
    types = [client.store.get_sampler(client.job_id, n).snapshot_type for n in names]
    assert types == ["INFERENCE_BASE", "INFERENCE_ARC_V2", "INFERENCE_ARC_V2"]
    assert deployment.stats.warmups == 3 and deployment.stats.prompt_cache_resets == 3
    _assert_serves(deployment, _snapshot_of(client))

    # A snapshot saved without syncing breaks the chain for the deployment: hotload reports
    # False, and the next save_and_hotload re-anchors with a base.
    skipped = syncer.save_only("skipped")
    later = syncer.save_only("later", checkpoint_type="delta")
    assert syncer.hotload(later, checkpoint_type="delta") is False
    assert isinstance(syncer.last_hotload_error, DeltaReferenceMismatchError)
    assert skipped in str(syncer.last_hotload_error)
    recovered = syncer.save_and_hotload("recovered")
    assert client.store.get_sampler(client.job_id, recovered).snapshot_type == "INFERENCE_BASE"
    syncer.reset_delta_chain()
    assert client.sampler_chain_head is None

    lora = WeightSyncer(policy_client=client, lora_rank=8)
    client.save_weights_for_sampler_ext("anchor")
    forced = lora.save_only("lora", checkpoint_type="delta")
    assert client.store.get_sampler(client.job_id, forced).snapshot_type == "INFERENCE_BASE"
    assert lora.check_deployment_state() is None
    with pytest.raises(ValueError, match="only 'arc_v2'"):
        WeightSyncer(policy_client=client, compression_format="zip")


def test_managed_service_syncs_snapshots_for_samplers(store_root, tiny_model_dir) -> None:
    service = ServiceClient.from_config(
        TEST_MODEL, deployment_id="managed", storage_root=store_root, device="cpu",
        mixed_precision="no", sampler_dtype="bfloat16",
        cleanup_deployment_on_close="scale_to_zero", api_key="unused",
        training_shape_id="accounts/fireworks/trainingShapes/ignored")
    assert service.deployment_id == "managed" and service.deploy_mgr.list_deployments() == []
    client = service.create_training_client(TEST_MODEL)
    assert service.trainer_job_id == client.job_id
    base = client.save_weights_for_sampler("s0").result()
    _step(client)
    delta = client.save_weights_for_sampler("s1").result()
    # A delta on a fresh deployment: the service loads the chain (base, then delta).
    sampler = service.create_sampling_client(model_path=delta.path)
    deployment = service.deploy_mgr.get("managed")
    assert deployment.current_snapshot_identity == delta.path
    assert deployment.stats.hotloads == 2
    response = sampler.sample(ModelInput.from_ints(PROMPTS[0]), num_samples=3,
                              sampling_params=SamplingParams(max_tokens=5, seed=1)).result()
    assert len(response.sequences) == 3
    assert all(len(s.tokens) == len(s.logprobs) for s in response.sequences)
    assert service.hotload_sampler_snapshot(base.snapshot_name) == [base.path]

    native = service.create_deployment_sampler()
    completions = asyncio.run(native.sample_with_tokens(
        [{"role": "user", "content": "hello"}], n=2, max_tokens=4, seed=7))
    assert len(completions) == 2
    for completion in completions:
        assert completion.full_tokens[:completion.prompt_len] == native.render(
            [{"role": "user", "content": "hello"}])
        assert len(completion.tokens) == len(completion.logprobs)
        assert completion.finish_reason in ("stop", "length")
        assert completion.text == native.tokenizer.decode(completion.tokens,
                                                          skip_special_tokens=True)
    service.close()
    assert deployment.state == "SCALED_TO_ZERO"


def test_service_cleanup_delete_and_trainer_only(store_root, tiny_model_dir) -> None:
    service = ServiceClient.from_config(TEST_MODEL, storage_root=store_root, device="cpu",
                                        cleanup_deployment_on_close="delete",
                                        cleanup_trainer_on_close=True)
    client = service.create_training_client(TEST_MODEL)
    service.create_sampling_client()
    deployment_id = service.deployment_id
    service.close()
    assert service.deploy_mgr.list_deployments() == []
    assert client.model is None
    with pytest.raises(DeploymentNotFoundError):
        service.deploy_mgr.get(deployment_id)

    trainer_only = ServiceClient.from_config(TEST_MODEL, storage_root=store_root,
                                             create_deployment=False)
    with pytest.raises(RuntimeError, match="create_deployment=False"):
        trainer_only.create_sampling_client()
    with pytest.raises(ValueError, match="cleanup_deployment_on_close='stop'"):
        ServiceClient.from_config(TEST_MODEL, cleanup_deployment_on_close="stop")


@pytest.mark.gpu
@pytest.mark.skipif(not vllm_available(), reason="needs the vllm package and a CUDA GPU")
def test_vllm_engine_hotloads_and_samples(store_root, tiny_model_dir) -> None:
    service = ServiceClient(store_root, mixed_precision="no", sampler_dtype="bfloat16")
    client = service.create_training_client(TEST_MODEL)
    manager = DeploymentManager(service.store, engine="vllm")
    deployment = manager.create_deployment(TEST_MODEL, "gpu")
    base = client.save_weights_for_sampler_ext("s0")
    manager.hotload("gpu", base.path)
    _step(client)
    manager.hotload("gpu", client.save_weights_for_sampler_ext("s1").path)
    out = deployment.sample(PROMPTS, SamplingParams(max_tokens=4, seed=0), num_samples=2)
    assert [len(seqs) for seqs in out] == [2, 2]
    assert all(len(s.tokens) == len(s.logprobs) for seqs in out for s in seqs)
    steps: list[list[int]] = []
    streamed = deployment.sample(PROMPTS[:1], SamplingParams(max_tokens=4, seed=0),
                                 on_token=steps.append)
    assert [step[0] for step in steps][:len(streamed[0][0].tokens)] == streamed[0][0].tokens


class _FakeVLLMEngine:
    """Stands in for vLLM's LLMEngine: DELTA outputs, each sample of a request on its own, as
    vLLM reports them for n > 1; request "b" finishes a step later than request "a"."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        self.requests: dict[str, tuple[dict, object]] = {}
        self.steps = 0
        self.fail_at_step = fail_at_step
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt, params) -> None:
        self.requests[request_id] = (prompt, params)

    def has_unfinished_requests(self) -> bool:
        return self.steps < 3

    def step(self):
        from types import SimpleNamespace as NS

        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("engine died")
        outputs = []
        for i, (request_id, (prompt, params)) in enumerate(self.requests.items()):
            length = 2 + i  # request i makes 2 + i tokens, one per step
            if self.steps > length:
                continue
            for index in range(params.n):
                token = prompt["prompt_token_ids"][0] * 100 + index * 10 + self.steps
                done = self.steps == length
                outputs.append(NS(request_id=request_id, finished=False, outputs=[NS(
                    index=index, token_ids=[token], logprobs=[{token: NS(logprob=-0.5)}],
                    finish_reason="length" if done else None)]))
            outputs[-1].finished = self.steps == length
        return outputs

    def abort_request(self, request_ids) -> None:
        self.aborted += request_ids


def _fake_vllm_engine(monkeypatch, fake: _FakeVLLMEngine):
    import sys
    from types import ModuleType, SimpleNamespace

    from training.sdk.deployments import VLLMEngine

    class Params:
        def __init__(self, **kwargs) -> None:
            self.__dict__.update(kwargs)

    vllm = ModuleType("vllm")
    vllm.SamplingParams = Params
    sampling = ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = SimpleNamespace(DELTA="delta")
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm = SimpleNamespace(llm_engine=fake)
    engine.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    return engine


def test_vllm_engine_streams_each_step_to_the_callback(monkeypatch) -> None:
    """The vLLM engine's streaming loop (the engine itself needs a GPU: a stand-in here)."""
    fake = _FakeVLLMEngine()
    engine = _fake_vllm_engine(monkeypatch, fake)
    steps: list[list[int]] = []
    out = engine.generate([[1], [2]], SamplingParams(max_tokens=3), num_samples=2,
                          on_token=steps.append)
    # Rows prompt-major; prompt 1 made 2 tokens, prompt 2 made 3: its last step pads rows 0-1.
    assert steps == [[101, 111, 201, 211], [102, 112, 202, 212], [0, 0, 203, 213]]
    assert [[s.tokens for s in seqs] for seqs in out] == [[[101, 102], [111, 112]],
                                                         [[201, 202, 203], [211, 212, 213]]]
    assert all(s.logprobs == [-0.5] * len(s.tokens) and s.stop_reason == "length"
               for seqs in out for s in seqs)
    assert all(params.output_kind == "delta" for _, params in fake.requests.values())
    assert fake.aborted == []

    failing = _FakeVLLMEngine(fail_at_step=2)
    engine = _fake_vllm_engine(monkeypatch, failing)
    with pytest.raises(RuntimeError, match="engine died"):
        engine.generate([[1], [2]], SamplingParams(max_tokens=3), on_token=lambda _: None)
    assert sorted(failing.aborted) == sorted(failing.requests)  # the engine is freed


def test_prompt_logprobs_equal_a_forward_pass(setup, store_root) -> None:
    client, manager, deployment = setup
    from training.sdk.sampling import SamplingClient

    sampler = SamplingClient(manager, deployment.deployment_id)
    prompt = PROMPTS[1]
    out = sampler.sample(ModelInput.from_ints(prompt), num_samples=1,
                         sampling_params=SamplingParams(max_tokens=2, seed=0),
                         include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
    with torch.no_grad():
        logprobs = torch.log_softmax(
            deployment.engine.model(torch.tensor([prompt])).logits[0, :-1].float(), -1)
    expected = logprobs.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), expected, atol=1e-5,
                               rtol=0)
    assert out.topk_prompt_logprobs[0] is None
    for position, top in enumerate(out.topk_prompt_logprobs[1:]):
        values, indices = logprobs[position].topk(3)
        assert [t for t, _ in top] == indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=1e-5, rtol=0)
    plain = sampler.sample(ModelInput.from_ints(prompt)).result()
    assert plain.prompt_logprobs is None and plain.topk_prompt_logprobs is None
