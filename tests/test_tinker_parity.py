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
