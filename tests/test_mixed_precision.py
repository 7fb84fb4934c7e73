"""fp16 mixed precision: dynamic loss scaling, its overflow skips, and its state across resume."""

from __future__ import annotations

import math

import pytest
import torch

from training.recipes.sft_loop import Config, main
from training.sdk import AdamParams, ServiceClient
from training.sdk.loss_scaling import DynamicLossScale
from training.sdk.tiny_model import SAMPLE_CHATS_PATH
from training.utils import InfraConfig
from training.utils.data import build_sft_examples, example_to_datum, load_chat_rows
from training.utils.metrics import read_metrics

from .conftest import TEST_MODEL, checkpoint_rows

ADAM = AdamParams(learning_rate=3e-3)


def _client(store_root: str, mixed_precision: str):
    torch.manual_seed(0)
    service = ServiceClient(store_root, device="cpu", mixed_precision=mixed_precision)
    return service.create_training_client(TEST_MODEL, 0)


def _datums(client, n: int = 8):
    rows = load_chat_rows(str(SAMPLE_CHATS_PATH))[:n]
    examples, _ = build_sft_examples(rows, client.get_tokenizer(), 512, "drop")
    return [example_to_datum(e) for e in examples]


def _step(client, datums):
    fwd = client.forward_backward(datums, "cross_entropy").result()
    optim = client.optim_step(ADAM, "num_loss_tokens").result()
    return fwd.metrics["loss:sum"] / fwd.metrics["num_loss_tokens"], optim.metrics


def test_fp16_skips_overflows_then_trains_like_fp32(store_root, tiny_model_dir):
    fp32, fp16 = _client(store_root, "no"), _client(store_root, "fp16")
    assert fp32.loss_scale is None and fp16.loss_scale.scale == 2.0 ** 16
    datums = _datums(fp32)
    fp32_losses = [_step(fp32, datums)[0] for _ in range(5)]
    applied, overflows = [], 0
    while len(applied) < 5:
        before = fp16.step
        loss, metrics = _step(fp16, datums)
        assert metrics["non_finite"] == 0.0 and "loss_scale" in metrics
        if metrics["overflow"] == 1.0:  # the update was skipped: nothing moved
            overflows += 1
            assert fp16.step == before and not math.isfinite(metrics["grad_norm"])
        else:
            applied.append(loss)
            assert fp16.step == before + 1 and math.isfinite(metrics["grad_norm"])
        assert overflows < 20
    # The scale came down from 2**16 one halving per overflow, then every update applied.
    assert fp16.loss_scale.scale == 2.0 ** (16 - overflows)
    # Losses before each applied update track fp32's, step for step, to fp16's precision.
    for ours, reference in zip(applied, fp32_losses, strict=True):
        assert ours == pytest.approx(reference, rel=2e-3)
    assert applied[-1] < applied[0] - 1.0


def test_an_overflow_leaves_weights_and_moments_and_halves_the_scale(store_root, tiny_model_dir):
    client = _client(store_root, "fp16")
    datums = _datums(client, 4)
    client.loss_scale.scale = 1024.0
    _step(client, datums)
    before = {n: p.detach().clone() for n, p in client.model.named_parameters()}
    state = client._optimizer.state[next(iter(client._optimizer.state))]
    moments = {k: v.clone() for k, v in state.items()}
    client.loss_scale.scale = 2.0 ** 60  # the lm_head's fp16 backward overflows
    _, metrics = _step(client, datums)
    assert metrics["overflow"] == 1.0 and metrics["non_finite"] == 0.0
    assert metrics["loss_scale"] == 2.0 ** 59 and client.step == 1
    assert all(torch.equal(p, before[n]) for n, p in client.model.named_parameters())
    assert all(torch.equal(state[k], moments[k]) for k in moments)
    # At the smallest scale a non-finite gradient is the gradient's own: reported as such.
    client.loss_scale.scale = DynamicLossScale.MIN_SCALE
    client.forward_backward_custom(datums, lambda d, lp: (lp[0].sum() * float("nan"), {}))
    metrics = client.optim_step(ADAM).result().metrics
    assert metrics["non_finite"] == 1.0 and "overflow" not in metrics and client.step == 1


def test_the_scale_grows_after_good_steps_and_resets_after_an_overflow():
    scale = DynamicLossScale(scale=8.0, growth_interval=2)
    scale.stepped()
    assert scale.scale == 8.0
    scale.stepped()
    assert (scale.scale, scale.good_steps) == (16.0, 0)
    scale.stepped()
    assert scale.overflowed() and (scale.scale, scale.good_steps) == (8.0, 0)
    scale.scale = DynamicLossScale.MIN_SCALE
    assert not scale.overflowed() and scale.scale == DynamicLossScale.MIN_SCALE


def test_the_loss_scale_resumes_with_the_optimizer(store_root, tiny_model_dir):
    client = _client(store_root, "fp16")
    datums = _datums(client, 4)
    client.loss_scale.scale = 512.0
    for _ in range(2):
        _step(client, datums)
    client.loss_scale.good_steps = 7
    saved = client.save_state("mid").result().path
    for _ in range(3):
        _step(client, datums)
    uninterrupted = {n: p.detach().clone() for n, p in client.model.named_parameters()}

    resumed = _client(store_root, "fp16")
    resumed.load_state_with_optimizer(saved).result()
    assert (resumed.loss_scale.scale, resumed.loss_scale.good_steps) == (512.0, 7)
    for _ in range(3):
        _step(resumed, datums)
    assert all(torch.equal(p, uninterrupted[n]) for n, p in resumed.model.named_parameters())
    # Weights only: a fresh optimizer, and a fresh scale with it.
    weights_only = _client(store_root, "fp16")
    weights_only.load_state(saved).result()
    assert weights_only.loss_scale.scale == DynamicLossScale().scale


def test_sft_in_fp16_counts_overflows_apart_from_non_finite_steps(tmp_path, tiny_model_dir):
    config = Config(log_path=str(tmp_path / "run"), base_model=TEST_MODEL, batch_size=4,
                    max_steps=10, dcp_save_interval=5, seed=3,
                    infra=InfraConfig(storage_root=str(tmp_path / "store"), num_threads=1,
                                      mixed_precision="fp16"))
    main(config)  # non_finite_policy=error: an overflow must not stop the run
    metrics = read_metrics(config.log_path)
    assert len(metrics) == 10 and all("loss_scale" in m for m in metrics)
    skipped = [m for m in metrics if m.get("skipped_overflow")]
    assert skipped and not any(m.get("skipped_non_finite") for m in metrics)
    assert metrics[-1]["loss_scale"] < 2.0 ** 16 and math.isfinite(metrics[-1]["grad_norm"])
    final = checkpoint_rows(config.log_path)[-1]
    assert final["state_path"] and final["sampler_path"]  # the final save is BOTH
