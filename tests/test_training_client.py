"""The Tinker-shaped training client on the tiny test model."""

from __future__ import annotations

import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from training.sdk import (
    AdamParams,
    Datum,
    GradAccNormalization,
    ModelInput,
    ServiceClient,
    StoreError,
    TensorData,
    datum_from_model_input_weights,
)
from training.sdk.store import CheckpointNotFoundError, JobNotFoundError

from .conftest import TEST_MODEL


def _datum(tokens: list[int], weights: list[float] | None = None) -> Datum:
    inputs = {"target_tokens": torch.tensor(tokens[1:])}
    if weights is not None:
        inputs["weights"] = torch.tensor(weights[1:], dtype=torch.float32)
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def _tokens(client, text: str) -> list[int]:
    return client.get_tokenizer()(text, add_special_tokens=False)["input_ids"]


def _weights(client) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in client.model.state_dict().items()}


def _train(client, datums, steps: int, lr: float = 1e-2) -> None:
    for _ in range(steps):
        client.forward_backward(datums, "cross_entropy").result()
        client.optim_step(AdamParams(learning_rate=lr),
                          GradAccNormalization.NUM_LOSS_TOKENS).result()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cross_entropy_matches_manual_logprobs(make_client):
    client = make_client()
    short = _tokens(client, "the quick brown fox")
    long = _tokens(client, "jumps over the lazy dog, twice and then once more")
    weights = [0.0] * 3 + [1.0] * (len(long) - 3)
    out = client.forward([_datum(short), _datum(long, weights)], "cross_entropy").result()

    with torch.no_grad():
        for tokens, got in ((short, out.loss_fn_outputs[0]), (long, out.loss_fn_outputs[1])):
            logits = client.model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float()
            expected = torch.log_softmax(logits, -1).gather(
                -1, torch.tensor(tokens[1:])[:, None])[:, 0]
            # Padding the short row inside the batch must not change its logprobs.
            torch.testing.assert_close(got["logprobs"].to_torch(), expected, atol=1e-5, rtol=0)
    lp_long = out.loss_fn_outputs[1]["logprobs"].to_torch()
    lp_short = out.loss_fn_outputs[0]["logprobs"].to_torch()
    expected_loss = -(lp_short.sum() + (torch.tensor(weights[1:]) * lp_long).sum())
    assert out.metrics["loss:sum"] == pytest.approx(float(expected_loss), rel=1e-5)
    assert out.metrics["num_loss_tokens"] == (len(short) - 1) + (len(long) - 3)
    assert out.metrics["num_sequences"] == 2


def test_forward_does_not_accumulate_gradients(make_client):
    client = make_client()
    client.forward([_datum(_tokens(client, "hello there"))]).result()
    assert all(p.grad is None for p in client.model.parameters())
    with pytest.raises(RuntimeError, match="forward_backward"):
        client.optim_step(AdamParams())


def test_grad_accumulation_normalization(store_root, tiny_model_dir):
    norms = {}
    for mode in (GradAccNormalization.NONE, GradAccNormalization.NUM_LOSS_TOKENS,
                 GradAccNormalization.NUM_SEQUENCES):
        client = ServiceClient(store_root, mixed_precision="no").create_training_client(TEST_MODEL)
        tokens = _tokens(client, "one two three four five six seven")
        datums = [_datum(tokens), _datum(tokens[:5])]
        fb = client.forward_backward(datums).result()
        result = client.optim_step(AdamParams(learning_rate=1e-3), mode).result()
        norms[mode] = result.metrics["grad_norm"]
        n_tokens = fb.metrics["num_loss_tokens"]
    assert norms[GradAccNormalization.NONE] / norms[GradAccNormalization.NUM_LOSS_TOKENS] == \
        pytest.approx(n_tokens, rel=1e-4)
    assert norms[GradAccNormalization.NONE] / norms[GradAccNormalization.NUM_SEQUENCES] == \
        pytest.approx(2, rel=1e-4)


def test_custom_loss_on_weight_datums_matches_builtin(store_root, tiny_model_dir):
    service_a = ServiceClient(store_root, mixed_precision="no")
    builtin = service_a.create_training_client(TEST_MODEL)
    custom = ServiceClient(store_root, mixed_precision="no").create_training_client(TEST_MODEL)
    tokens = _tokens(builtin, "a custom loss sees per token logprobs")
    weights = [0.0, 0.0] + [1.0] * (len(tokens) - 2)

    fb = builtin.forward_backward([_datum(tokens, weights)]).result()

    def weighted_nll(data, logprobs_list):
        w = data[0].loss_fn_inputs["weights"].to_torch()
        loss = -(w * logprobs_list[0]).sum()
        return loss, {"loss": float(loss.detach())}

    weight_datum = datum_from_model_input_weights(ModelInput.from_ints(tokens), weights)
    out = custom.forward_backward_custom([weight_datum], weighted_nll).result()
    assert out.metrics["loss"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-5)
    # Weight-only datums: position 0 predicts nothing, the rest align with the tokens.
    lp = out.loss_fn_outputs[0]["logprobs"].to_torch()
    assert lp.shape[0] == len(tokens) and lp[0] == 0
    torch.testing.assert_close(lp[1:], fb.loss_fn_outputs[0]["logprobs"].to_torch())
    for (name, p_a), p_b in zip(builtin.model.named_parameters(), custom.model.parameters(),
                                strict=True):
        torch.testing.assert_close(p_a.grad, p_b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bad_datums_and_losses_are_refused(make_client):
    client = make_client()
    tokens = _tokens(client, "some words here")
    weight_datum = datum_from_model_input_weights(ModelInput.from_ints(tokens),
                                                  [1.0] * len(tokens))
    with pytest.raises(ValueError, match="target_tokens.*forward_backward_custom"):
        client.forward_backward([weight_datum]).result()
    bad = Datum(model_input=ModelInput.from_ints(tokens),
                loss_fn_inputs={"target_tokens": TensorData(data=[1, 2], dtype="int64")})
    with pytest.raises(ValueError, match="datum 0: target_tokens has 2 entries"):
        client.forward_backward([bad])
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        client.forward_backward([_datum(tokens)], "mse")
    with pytest.raises(TypeError, match=r"\(loss_tensor, metrics_dict\)"):
        client.forward_backward_custom([_datum(tokens)], lambda d, lp: lp[0].sum())
    with pytest.raises(ValueError, match="no datums"):
        client.forward_backward([])


def test_second_client_for_same_model_is_refused(store_root, tiny_model_dir):
    service = ServiceClient(store_root, mixed_precision="no")
    service.create_training_client(TEST_MODEL)
    with pytest.raises(ValueError, match="already has a training client"):
        service.create_training_client(TEST_MODEL)


def test_calls_return_completed_futures(make_client):
    client = make_client()
    future = client.forward_backward([_datum(_tokens(client, "futures in call order"))])
    assert future.done() and future.result().metrics["num_sequences"] == 1
    step = client.optim_step(AdamParams(learning_rate=1e-3))
    assert step.result().metrics["step"] == 1 and client.step == 1


def test_save_and_load_state_with_optimizer_is_exact(make_client):
    client = make_client()
    datums = [_datum(_tokens(client, "resume must be exact to the last bit"))]
    _train(client, datums, 2)
    saved = client.save_state("step-2", user_state={"data_consumed": 16}).result()
    assert saved.path == f"cross_job://{client.job_id}/step-2"
    _train(client, datums, 2)
    reference = _weights(client)

    loaded = client.load_state_with_optimizer("step-2").result()
    assert loaded.user_state == {"data_consumed": 16} and client.step == 2
    _train(client, datums, 2)
    assert _same(_weights(client), reference)


def test_load_state_resets_the_optimizer(make_client):
    client = make_client()
    datums = [_datum(_tokens(client, "weights only, fresh optimizer"))]
    _train(client, datums, 2)
    client.save_state("step-2").result()
    at_save = _weights(client)
    _train(client, datums, 1)
    with_optimizer = _weights(client)

    client.load_state("step-2").result()
    assert client.step == 0 and _same(_weights(client), at_save)
    _train(client, datums, 1)
    # A fresh Adam's first update differs from one with two steps of moments.
    assert not _same(_weights(client), with_optimizer)


def test_cross_job_resolution(make_client, store_root):
    source = make_client()
    _train(source, [_datum(_tokens(source, "cross job"))], 1)
    source.save_state("step-1").result()
    target = make_client()
    ref = target.resolve_checkpoint_path("step-1", source_job_id=source.job_id)
    assert ref == f"cross_job://{source.job_id}/step-1"
    target.load_state_with_optimizer(ref).result()
    assert _same(_weights(target), _weights(source))
    assert source.list_checkpoints() == ["step-1"] and target.list_checkpoints() == []
    with pytest.raises(CheckpointNotFoundError, match="no train state 'step-9'.*step-1"):
        target.resolve_checkpoint_path("step-9", source_job_id=source.job_id)
    with pytest.raises(JobNotFoundError, match="no trainer job 'nosuchjob'"):
        target.resolve_checkpoint_path("step-1", source_job_id="nosuchjob")


def test_corrupt_state_is_a_clear_error(make_client, store_root):
    client = make_client()
    client.save_state("step-0").result()
    state_dir = client.store.state_dir(client.job_id, "step-0")
    shard = next(p for p in client.store.fs.ls(state_dir, detail=False) if p.endswith(".distcp"))
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match=f"{client.job_id}:step-0: file .*distcp does not match "
                                         f"the checksum .* the checkpoint is corrupt"):
        client.load_state("step-0").result()


def test_incomplete_state_is_invisible(make_client):
    client = make_client()
    client.save_state("step-1").result()
    client.store.fs.rm(f"{client.store.state_dir(client.job_id, 'step-1')}/meta.json")
    assert client.list_checkpoints() == []
    with pytest.raises(CheckpointNotFoundError):
        client.load_state("step-1")
    client.save_state("step-1").result()  # a rerun's save replaces the leftover
    assert client.list_checkpoints() == ["step-1"]


def test_ttl_expiry(make_client, monkeypatch):
    client = make_client()
    client.save_state("keep").result()
    client.save_state("temp", ttl_seconds=60).result()
    assert client.list_checkpoints() == ["keep", "temp"]
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 120)
    assert client.list_checkpoints() == ["keep"]
    assert client.store.cleanup_expired(client.job_id) == ["states/temp"]
    assert not client.store.fs.exists(client.store.state_dir(client.job_id, "temp"))


def test_sampler_weights_load_with_plain_transformers(make_client):
    client = make_client()
    _train(client, [_datum(_tokens(client, "sampler snapshot"))], 1)
    result = client.save_weights_for_sampler("final").result()
    assert re.fullmatch(r"final-[0-9a-f]{8}", result.snapshot_name)
    assert result.path == f"sampler://{client.job_id}/{result.snapshot_name}"
    meta = client.store.get_sampler(client.job_id, result.snapshot_name)
    assert meta.snapshot_type == "INFERENCE_BASE"
    model = AutoModelForCausalLM.from_pretrained(
        client.store.sampler_dir(client.job_id, result.snapshot_name))
    for name, tensor in client.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    client.reset_sampler_chain()  # a delta needs a base of this session to build on
    with pytest.raises(ValueError, match="has no base snapshot in this session"):
        client.save_weights_for_sampler_ext("x", checkpoint_type="delta")


def test_invalid_names_are_refused(make_client):
    client = make_client()
    for bad in ("../escape", "", "a/b", " lead"):
        with pytest.raises(ValueError, match="invalid checkpoint name"):
            client.save_state(bad)


def test_loading_a_state_of_another_base_model_is_refused(make_client, store_root):
    client = make_client()
    client.save_state("s").result()
    meta_path = f"{client.store.state_dir(client.job_id, 's')}/meta.json"
    text = client.store.fs.cat(meta_path).decode().replace(TEST_MODEL, "other/model")
    client.store.fs.pipe(meta_path, text.encode())
    with pytest.raises(ValueError, match="trained from base_model 'other/model'"):
        client.load_state("s")


def test_store_on_an_fsspec_url(make_client):
    """States and snapshots round-trip through a non-local fsspec store (memory://)."""
    client = make_client(root="memory://homefire-test-store")
    datums = [_datum(_tokens(client, "remote stores stage locally"))]
    _train(client, datums, 1)
    client.save_state("step-1").result()
    expected = _weights(client)
    _train(client, datums, 1)
    client.load_state_with_optimizer("step-1").result()
    assert _same(_weights(client), expected) and client.list_checkpoints() == ["step-1"]
    snapshot = client.save_weights_for_sampler_ext("step-1").snapshot_name
    files = client.store.fs.ls(client.store.sampler_dir(client.job_id, snapshot), detail=False)
    assert {f.rsplit("/", 1)[-1] for f in files} >= {"model.safetensors", "config.json",
                                                     "tokenizer.json", "meta.json"}


def test_reference_client_is_frozen_and_independent(store_root, tiny_model_dir):
    service = ServiceClient(store_root, mixed_precision="no")
    policy = service.create_training_client(TEST_MODEL)
    reference = service.create_reference_client(TEST_MODEL)
    assert service.create_base_training_client(TEST_MODEL) is reference
    datums = [_datum(_tokens(policy, "a frozen reference"))]
    before = reference.forward(datums).result().loss_fn_outputs[0]["logprobs"].to_torch()
    _train(policy, datums, 2)
    after = reference.forward(datums).result().loss_fn_outputs[0]["logprobs"].to_torch()
    assert torch.equal(before, after)
    policy_lp = policy.forward(datums).result().loss_fn_outputs[0]["logprobs"].to_torch()
    assert not torch.equal(policy_lp, after)
    with pytest.raises(RuntimeError, match="frozen reference client"):
        reference.forward_backward(datums)
    with pytest.raises(RuntimeError, match="frozen reference client"):
        reference.optim_step(AdamParams())


def test_packing_puts_short_sequences_together_without_cross_attention(make_client):
    from training.sdk.training_client import pack_sequences

    lengths = [40, 10, 25, 7, 30]
    inputs = [list(range(1, n + 1)) for n in lengths]
    batch = pack_sequences(inputs, [torch.tensor(t) for t in inputs], pad_id=0)
    assert batch.input_ids.shape == (3, 48)  # 112 tokens in rows of 48 instead of 5 rows
    seen = set()
    for (row, offset, length), tokens in zip(batch.placements, inputs, strict=True):
        assert batch.input_ids[row, offset:offset + length].tolist() == tokens
        assert batch.position_ids[row, offset:offset + length].tolist() == list(range(length))
        mask = batch.attention_mask[row, 0]
        # Each position sees exactly its own sequence's earlier positions.
        assert mask[offset:offset + length, offset:offset + length].sum() == \
            length * (length + 1) // 2
        assert mask[offset:offset + length].sum() == length * (length + 1) // 2
        seen.update((row, p) for p in range(offset, offset + length))
    assert len(seen) == sum(lengths)

    client = make_client()
    assert client._attention_cost is not None  # the client widens rows where that pays
    for lengths in ([40, 10, 25, 7, 30], [100, 60, 60, 60]):
        datums = [_datum(list(range(5, 5 + n))) for n in lengths]
        packed = client.forward(datums).result()
        for datum, out in zip(datums, packed.loss_fn_outputs, strict=True):
            alone = client.forward([datum]).result().loss_fn_outputs[0]["logprobs"].to_torch()
            torch.testing.assert_close(out["logprobs"].to_torch(), alone, atol=1e-5, rtol=0)


def test_per_document_attention_trains_like_dense_masks(make_client):
    """The CPU default (one row, attention per document) against rows with dense masks."""
    client = make_client()
    assert client._per_document_attention
    datums = [_datum(list(range(5, 5 + n))) for n in (40, 10, 25, 7, 30)]
    results = {}
    for per_document in (True, False):
        client._per_document_attention = per_document
        out = client.forward_backward(datums).result()
        grads = {n: p.grad.clone() for n, p in client.model.named_parameters()}
        client.model.zero_grad(set_to_none=True)
        results[per_document] = ([o["logprobs"].to_torch() for o in out.loss_fn_outputs], grads)
    for a, b in zip(results[True][0], results[False][0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for name, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][name], atol=1e-5, rtol=1e-4)


def test_packing_widens_rows_when_that_leaves_less_padding():
    from training.sdk.training_client import pack_sequences

    # Rows as long as the longest (112) hold one sequence each: 4 x 112, 46% padding.
    lengths = [100, 60, 60, 60]
    inputs = [list(range(1, n + 1)) for n in lengths]
    targets = [torch.tensor(t) for t in inputs]
    assert pack_sequences(inputs, targets, pad_id=0).input_ids.shape == (4, 112)
    # Costing a position at 1 + row_len / 1280: 2 rows of 160 (100 + 60, 60 + 60) are cheapest.
    wide = pack_sequences(inputs, targets, pad_id=0, attention_cost=1280)
    assert wide.input_ids.shape == (2, 160)
    taken = [set() for _ in range(2)]
    for (row, offset, length), tokens in zip(wide.placements, inputs, strict=True):
        assert wide.input_ids[row, offset:offset + length].tolist() == tokens
        assert not taken[row] & set(range(offset, offset + length))
        taken[row] |= set(range(offset, offset + length))
    # For per-document attention everything shares one row; padding counts on as its own.
    one_row = pack_sequences(inputs, targets, pad_id=0, per_document_attention=True)
    assert one_row.input_ids.shape == (1, 288) and one_row.attention_mask is None
    assert one_row.placements == [(0, 0, 100), (0, 100, 60), (0, 160, 60), (0, 220, 60)]
    assert one_row.position_ids[0, 220:].tolist() == [*range(60), *range(8)]
    # Equal lengths gain nothing from wider rows.
    same = [list(range(1, 65))] * 3
    assert pack_sequences(same, [torch.tensor(t) for t in same], pad_id=0,
                          attention_cost=1280).input_ids.shape == (3, 64)


def test_grad_clip_norm_bounds_the_update(store_root, tiny_model_dir):
    updates = {}
    for clip in (0.0, 1e-3):
        client = ServiceClient(store_root, mixed_precision="no").create_training_client(TEST_MODEL)
        before = _weights(client)
        client.forward_backward([_datum(_tokens(client, "clip the gradient norm"))]).result()
        grads = {n: p.grad.clone() for n, p in client.model.named_parameters()}
        # Adam hides the gradient scale in the update; read the gradient the optimizer sees.
        captured = {}
        client._ensure_optimizer().register_step_pre_hook(
            lambda opt, *_, captured=captured: captured.update(
                norm=float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for g in opt.param_groups for p in g["params"]])))))
        metrics = client.optim_step(AdamParams(learning_rate=1e-3, grad_clip_norm=clip)).result()
        raw = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
        assert metrics.metrics["grad_norm"] == pytest.approx(raw, rel=1e-5)
        updates[clip] = captured["norm"]
        assert not _same(before, _weights(client))
    assert updates[0.0] > 1e-2  # unclipped: the raw gradient norm
    assert updates[1e-3] == pytest.approx(1e-3, rel=1e-3)


def test_reference_client_loads_full_weights_from_a_state(make_client, store_root):
    policy = make_client()
    _train(policy, [_datum(_tokens(policy, "reference from a checkpoint"))], 2, lr=5e-2)
    ref_path = policy.save_state("step-2").result().path
    reference = ServiceClient(store_root, mixed_precision="no").create_reference_client(
        TEST_MODEL)
    reference.load_state(ref_path).result()
    assert _same(_weights(reference), _weights(policy))


def test_compiled_client_trains_like_the_eager_one(store_root, tiny_model_dir):
    """compile=True (torch.compile, dynamic shapes; ~30 s to compile here) gives the same
    losses as eager execution up to float rounding, over packed batches of changing shapes."""
    from training.sdk import ServiceClient

    losses = {}
    for compile in (False, True):
        service = ServiceClient(f"{store_root}-{compile}", mixed_precision="no", device="cpu",
                                compile=compile)
        client = service.create_training_client(TEST_MODEL)
        losses[compile] = []
        for i in range(3):
            tokens = list(range(10 + i, 60 + 7 * i))
            datums = [_datum(tokens), _datum(tokens[:21])]
            out = client.forward_backward(datums).result()
            client.optim_step(AdamParams(learning_rate=1e-2)).result()
            losses[compile].append(out.metrics["loss:sum"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(store_root, tiny_model_dir,
                                                                  lora_rank):
    from training.sdk import AdamParams, Datum, ServiceClient

    datum = Datum(model_input=list(range(5, 37)), loss_fn_inputs={"target_tokens":
                                                                  list(range(6, 38))})
    losses, weights = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        client = ServiceClient(store_root, device="cpu", mixed_precision="no",
                               gradient_checkpointing=checkpointing) \
            .create_training_client(TEST_MODEL, lora_rank=lora_rank)
        losses.append(client.forward_backward([datum]).result().metrics["loss:sum"])
        client.optim_step(AdamParams(learning_rate=1e-2)).result()
        weights.append({n: p.detach().clone() for n, p in client.model.named_parameters()
                        if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)
