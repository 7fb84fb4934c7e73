"""RL losses, advantages and rewards against independent scalar formulas (no model)."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from training.utils.rewards import (
    RewardError,
    call_reward,
    exact_match,
    load_reward_fn,
    numeric_answer,
    regex_coverage,
    regex_match,
    required_fields,
)
from training.utils.rl_losses import group_advantages, policy_loss, resolve_clip

# Two sequences of 3 and 2 tokens. Log-ratios logp - old of sequence 0 are +0.5, -0.05, +0.1
# (ratios 1.65, 0.95, 1.11: the first beyond a 0.2 clip); sequence 1 has -0.4 (ratio 0.67,
# below the clip) and +0.01. old - mu = 1.0 on one token (pi_old / mu = e > tis_cap 2).
LOGP = [[-1.0, -2.0, -0.5], [-3.0, -0.2]]
OLD = [[-1.5, -1.95, -0.6], [-2.6, -0.21]]
MU = [[-1.5, -2.95, -0.6], [-2.5, -0.2]]
REF = [[-1.2, -2.1, -0.4], [-2.9, -0.3]]
ADV = [1.5, -0.8]


def _inputs():
    logp = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in LOGP]
    old = [torch.tensor(x, dtype=torch.float64) for x in OLD]
    mu = [torch.tensor(x, dtype=torch.float64) for x in MU]
    ref = [torch.tensor(x, dtype=torch.float64) for x in REF]
    return logp, old, mu, ref, torch.tensor(ADV, dtype=torch.float64)


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _check(out, logp, expected_loss: float, expected_grads: list[list[float]]) -> None:
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)
    out.loss.backward()
    for got, want in zip(logp, expected_grads, strict=True):
        assert got.grad.tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("loss,low,high", [("grpo", 0.2, 0.2), ("dapo", 0.2, 0.28)])
def test_ppo_clip_with_truncated_is_matches_the_scalar_formula(loss, low, high):
    logp, old, mu, _, adv = _inputs()
    out = policy_loss(logp, old, mu, adv, loss=loss, tis_cap=2.0)
    total, grads, clipped = 0.0, [], 0
    for lp_seq, old_seq, mu_seq, a in zip(LOGP, OLD, MU, ADV, strict=True):
        seq_grads = []
        for lp, o, m in zip(lp_seq, old_seq, mu_seq, strict=True):
            w = min(math.exp(o - m), 2.0)
            r = math.exp(lp - o)
            unclipped, clipped_term = r * a, _clip(r, 1 - low, 1 + high) * a
            total += -w * min(unclipped, clipped_term)
            # d/dlogp of -w*r*A is -w*r*A; the clipped branch is constant in logp.
            takes_clipped = clipped_term < unclipped
            seq_grads.append(0.0 if takes_clipped else -w * r * a)
            clipped += takes_clipped
        grads.append(seq_grads)
    _check(out, logp, total, grads)
    assert out.clip_fraction == pytest.approx(clipped / 5)
    assert clipped == 2  # both branches are exercised: ratio 1.65 (A > 0) and 0.67 (A < 0)
    assert out.tis_clip_fraction == pytest.approx(1 / 5)
    assert out.num_tokens == 5


def test_dapo_clips_less_above_than_grpo():
    """The asymmetric upper clip keeps a ratio of 1.25 (A > 0) in the gradient."""
    logp = [torch.tensor([math.log(1.25)], requires_grad=True)]
    old, mu, adv = [torch.zeros(1)], [torch.zeros(1)], torch.tensor([1.0])
    assert policy_loss(logp, old, mu, adv, loss="grpo").clip_fraction == 1.0
    assert policy_loss(logp, old, mu, adv, loss="dapo").clip_fraction == 0.0


def test_tis_cap_zero_disables_the_correction():
    logp, old, mu, _, adv = _inputs()
    with_tis = policy_loss(logp, old, mu, adv, loss="grpo", tis_cap=2.0).loss.item()
    without = policy_loss(logp, old, old, adv, loss="grpo", tis_cap=2.0).loss.item()
    off = policy_loss(logp, old, mu, adv, loss="grpo", tis_cap=0).loss.item()
    assert off == pytest.approx(without)  # mu ignored: weight 1, as if mu == pi_old
    assert with_tis != pytest.approx(off)


def test_gspo_uses_one_sequence_ratio_spread_over_its_tokens():
    logp, old, mu, _, adv = _inputs()
    low, high = 0.19, 0.19
    out = policy_loss(logp, old, mu, adv, loss="gspo", clip_eps_low=low, clip_eps_high=high,
                      tis_cap=2.0)
    total, grads = 0.0, []
    for lp_seq, old_seq, mu_seq, a in zip(LOGP, OLD, MU, ADV, strict=True):
        n = len(lp_seq)
        s = math.exp(sum(lp - o for lp, o in zip(lp_seq, old_seq, strict=True)) / n)
        w = min(math.exp(sum(o - m for o, m in zip(old_seq, mu_seq, strict=True)) / n), 2.0)
        unclipped, clipped_term = s * a, _clip(s, 1 - low, 1 + high) * a
        total += -w * min(unclipped, clipped_term)
        # ds/dlogp_t = s / n for every token of the sequence.
        g = 0.0 if clipped_term < unclipped else -w * a * s / n
        grads.append([g] * n)
    _check(out, logp, total, grads)
    # Sequence 0's ratio exp(0.55 / 3) = 1.20 is clipped (A > 0, zero gradient); sequence 1's
    # exp(-0.39 / 2) = 0.82 is inside [0.81, 1.19] (non-zero gradient): 3 of 5 tokens.
    assert out.clip_fraction == pytest.approx(3 / 5)
    assert grads[0] == [0.0] * 3 and grads[1][0] != 0.0


def test_cispo_is_reinforce_with_a_truncated_stop_gradient_weight():
    logp, old, mu, _, adv = _inputs()
    out = policy_loss(logp, old, mu, adv, loss="cispo", clip_eps_low=0.5, clip_eps_high=0.5)
    total, grads, clipped = 0.0, [], 0
    for lp_seq, mu_seq, a in zip(LOGP, MU, ADV, strict=True):
        seq_grads = []
        for lp, m in zip(lp_seq, mu_seq, strict=True):
            raw = math.exp(lp - m)
            weight = _clip(raw, 0.5, 1.5)
            clipped += weight != raw
            total += -weight * a * lp
            seq_grads.append(-weight * a)  # the weight carries no gradient
        grads.append(seq_grads)
    _check(out, logp, total, grads)
    assert out.clip_fraction == pytest.approx(clipped / 5) and clipped > 0


def test_importance_sampling_is_the_unclipped_ratio_to_the_sampler():
    logp, old, mu, _, adv = _inputs()
    out = policy_loss(logp, old, mu, adv, loss="importance_sampling")
    total = sum(-math.exp(lp - m) * a for lp_seq, mu_seq, a in zip(LOGP, MU, ADV, strict=True)
                for lp, m in zip(lp_seq, mu_seq, strict=True))
    grads = [[-math.exp(lp - m) * a for lp, m in zip(lp_seq, mu_seq, strict=True)]
             for lp_seq, mu_seq, a in zip(LOGP, MU, ADV, strict=True)]
    _check(out, logp, total, grads)
    assert out.clip_fraction == 0.0


def test_kl_penalty_adds_beta_times_k3():
    logp, old, mu, ref, adv = _inputs()
    beta = 0.3
    base = policy_loss(logp, old, mu, adv, loss="importance_sampling").loss.item()
    out = policy_loss(logp, old, mu, adv, loss="importance_sampling", reference_logprobs=ref,
                      kl_beta=beta)
    k3 = [math.exp(r - lp) - (r - lp) - 1 for lp_seq, r_seq in zip(LOGP, REF, strict=True)
          for lp, r in zip(lp_seq, r_seq, strict=True)]
    assert out.loss.item() == pytest.approx(base + beta * sum(k3), rel=1e-6)
    assert out.kl == pytest.approx(sum(k3) / 5, rel=1e-6)
    with pytest.raises(ValueError, match="needs reference_logprobs"):
        policy_loss(logp, old, mu, adv, kl_beta=0.1)


def test_on_policy_grpo_gradient_is_the_policy_gradient():
    """With pi_old = sg(pi_theta) = mu, every ratio is 1: GRPO's gradient is -A per token."""
    logp = [torch.tensor(x, requires_grad=True) for x in LOGP]
    old = [x.detach() for x in logp]
    out = policy_loss(logp, old, old, torch.tensor(ADV), loss="grpo")
    out.loss.backward()
    assert logp[0].grad.tolist() == pytest.approx([-1.5] * 3)
    assert logp[1].grad.tolist() == pytest.approx([0.8] * 2)
    assert out.clip_fraction == 0.0 and out.ratio_mean == pytest.approx(1.0)


def test_default_clips_per_loss():
    assert resolve_clip("grpo", None, None) == (0.2, 0.2)
    assert resolve_clip("dapo", None, None) == (0.2, 0.28)
    assert resolve_clip("grpo", 0.1, None) == (0.1, 0.1)
    assert resolve_clip("dapo", 0.1, None) == (0.1, 0.28)
    with pytest.raises(ValueError, match="loss='ppo'"):
        resolve_clip("ppo", None, None)


def test_group_advantages_normalize_within_groups_and_drop_equal_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    out = group_advantages(rewards)
    assert out.keep.tolist() == [True, False, True]
    assert out.num_filtered == 1
    for row, got in zip(rewards.tolist(), out.advantages.tolist(), strict=True):
        mean = sum(row) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / 4)
        want = [(x - mean) / (std + 1e-6) for x in row] if std else [0.0] * 4
        assert got == pytest.approx(want, rel=1e-5)
    centered = group_advantages(rewards, scale_by_std=False).advantages
    assert centered[2].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.ones(3, 1))


# ----------------------------------------------------------------------------------- rewards
def test_builtin_rewards():
    assert exact_match({"answer": " 42 "}, "42\n") == 1.0
    assert exact_match({"answer": "42"}, "41") == 0.0
    assert numeric_answer({"answer": 1024}, "It is 1,024.") == 1.0
    assert numeric_answer({"answer": "3.5"}, "3 then 3.50") == 1.0
    assert numeric_answer({"answer": "7"}, "7 or 8") == 0.0  # the last number counts
    assert numeric_answer({"answer": "7"}, "seven") == 0.0
    assert regex_match({"pattern": r"\d+\."}, " 12. ") == 1.0
    assert regex_match({"pattern": r"\d+\."}, "12") == 0.0
    row = {"pattern": r"(?i)\s*\bs\w*"}
    assert regex_coverage(row, "sun moon Star") == pytest.approx(len("sun Star") / 13)
    assert regex_coverage(row, "cats") == 0.0  # the 's' must start a word
    assert regex_coverage(row, "") == 0.0
    assert required_fields(numeric_answer) == ("answer",)


def test_reward_loader_builtins_custom_and_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(row, completion):
            return len(completion)
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    assert load_reward_fn("numeric_answer") is numeric_answer
    assert load_reward_fn("my_rewards:length")({}, "abc") == 3
    for spec, match in [("nope", "not a built-in reward"), ("no_such_mod:f", "cannot import"),
                        ("my_rewards:missing", "has no attribute 'missing'"),
                        ("my_rewards:NOT_CALLABLE", "not a function"), (":f", "expected")]:
        with pytest.raises(RewardError, match=match):
            load_reward_fn(spec)


def test_call_reward_names_the_row_on_bad_values():
    assert call_reward(lambda row, c: True, {}, "x", "p.jsonl:3") == 1.0
    with pytest.raises(RewardError, match=r"p.jsonl:3: .* returned nan"):
        call_reward(lambda row, c: float("nan"), {}, "x", "p.jsonl:3")
    with pytest.raises(RewardError, match=r"p.jsonl:4: .* returned '1'"):
        call_reward(lambda row, c: "1", {}, "x", "p.jsonl:4")
    with pytest.raises(RewardError, match=r"p.jsonl:5: reward function .* raised KeyError"):
        call_reward(lambda row, c: row["answer"], {}, "x", "p.jsonl:5")
