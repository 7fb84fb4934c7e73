"""Preference losses against textbook formulas written out independently, in plain floats."""

from __future__ import annotations

import math

import pytest
import torch

from training.utils.losses import dpo_loss, orpo_loss


def _logps(n: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Four [n] tensors of sequence log-probs (nats) around -40, float64."""
    g = torch.Generator().manual_seed(seed)
    return [-40 + 15 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4)]


def _textbook_dpo(pc: float, pr: float, rc: float, rr: float, beta: float, kind: str) -> float:
    # Rafailov et al. eq. 7; Azar et al. eq. 17; SLiC-HF's hinge.
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        return -math.log(1.0 / (1.0 + math.exp(-beta * h)))
    if kind == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    return max(0.0, 1.0 - beta * h)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_dpo_loss_equals_the_textbook_formula(kind, beta):
    pc, pr, rc, rr = _logps(seed=int(beta * 100))
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=kind)
    expected = [_textbook_dpo(*map(float, v), beta, kind) for v in zip(pc, pr, rc, rr, strict=True)]
    assert out.losses.shape == (16,)
    for got, want in zip(out.losses.tolist(), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6, rel=1e-9)
    assert float(out.loss) == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    # Hinge pairs beyond the margin and sigmoid's saturation both occur in this draw.
    if kind == "hinge":
        assert 0 < sum(v == 0.0 for v in expected) < len(expected)


def test_dpo_rewards_metrics_and_gradient():
    pc = torch.tensor([-10.0, -20.0, -5.0], requires_grad=True)
    pr = torch.tensor([-12.0, -18.0, -5.0], requires_grad=True)
    rc = torch.tensor([-11.0, -19.0, -6.0], requires_grad=True)
    rr = torch.tensor([-11.0, -19.0, -6.0], requires_grad=True)
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # rewards = beta * (policy - reference)
    assert out.chosen_rewards.tolist() == [0.5, -0.5, 0.5]
    assert out.rejected_rewards.tolist() == [-0.5, 0.5, 0.5]
    metrics = out.metrics()
    assert metrics["preference_accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert metrics["reward_margin"] == pytest.approx((1.0 - 1.0 + 0.0) / 3)
    assert metrics["chosen_reward"] == pytest.approx(0.5 / 3)
    out.loss.backward()
    # d/d(pc) of -log sigmoid(beta h) / n is -beta * sigmoid(-beta h) / n.
    h = torch.tensor([2.0, -2.0, 0.0])
    assert torch.allclose(pc.grad, -0.5 * torch.sigmoid(-0.5 * h) / 3, atol=1e-7)
    assert torch.allclose(pr.grad, -pc.grad, atol=1e-7)
    # The reference is a constant: no gradient flows into it.
    assert rc.grad is None and rr.grad is None


@pytest.mark.parametrize("bad,match", [
    ({"loss_type": "kto"}, "loss_type='kto'"),
    ({"beta": 0.0}, "beta must be > 0"),
])
def test_dpo_loss_rejects_bad_arguments(bad, match):
    pc, pr, rc, rr = _logps(4)
    with pytest.raises(ValueError, match=match):
        dpo_loss(pc, pr, rc, rr, **{"beta": 0.1, **bad})
    with pytest.raises(ValueError, match="one \\[pairs\\] shape"):
        dpo_loss(pc, pr[:3], rc, rr, beta=0.1)


def _textbook_orpo(c_sum: float, r_sum: float, c_len: float, r_len: float,
                   lam: float) -> float:
    # Hong et al. 2024, eq. 2-6: P = exp(mean token logp), odds = P / (1 - P).
    pc, pr = math.exp(c_sum / c_len), math.exp(r_sum / r_len)
    odds_ratio = (pc / (1 - pc)) / (pr / (1 - pr))
    l_or = -math.log(1 / (1 + math.exp(-math.log(odds_ratio))))
    return -c_sum / c_len + lam * l_or


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_loss_equals_the_paper_formula(lam):
    g = torch.Generator().manual_seed(3)
    c_len = torch.randint(1, 30, (12,), generator=g).double()
    r_len = torch.randint(1, 30, (12,), generator=g).double()
    # Mean token log-probs from -6 (p ~ 0.0025) to -0.01 (p ~ 0.99), both regimes of log1m_exp.
    c_sum = -torch.empty(12, dtype=torch.float64).uniform_(0.01, 6, generator=g) * c_len
    r_sum = -torch.empty(12, dtype=torch.float64).uniform_(0.01, 6, generator=g) * r_len
    out = orpo_loss(c_sum, r_sum, c_len, r_len, orpo_lambda=lam)
    expected = [_textbook_orpo(*map(float, v), lam)
                for v in zip(c_sum, r_sum, c_len, r_len, strict=True)]
    for got, want in zip(out.losses.tolist(), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6, rel=1e-9)
    assert torch.allclose(out.chosen_rewards, lam * c_sum / c_len)
    metrics = out.metrics()
    assert metrics["nll_loss"] == pytest.approx(float((-c_sum / c_len).mean()))
    wins = sum(c / cl > r / rl for c, r, cl, rl in zip(c_sum, r_sum, c_len, r_len, strict=True))
    assert 0 < wins < 12 and metrics["preference_accuracy"] == pytest.approx(float(wins) / 12)


def test_orpo_loss_stays_finite_when_the_model_is_certain():
    chosen = torch.tensor([0.0, -1e-9], requires_grad=True)  # P(chosen) == 1 in float
    out = orpo_loss(chosen, torch.tensor([-5.0, -5.0]), torch.ones(2), torch.ones(2),
                    orpo_lambda=0.5)
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(chosen.grad).all()
    with pytest.raises(ValueError, match="at least one trained token"):
        orpo_loss(chosen, chosen, torch.tensor([1.0, 0.0]), torch.ones(2), orpo_lambda=0.5)
    with pytest.raises(ValueError, match="orpo_lambda must be > 0"):
        orpo_loss(chosen, chosen, torch.ones(2), torch.ones(2), orpo_lambda=0)


def test_loss_fn_type_names_exactly_the_builtin_losses():
    """``LossFnType`` (the Literal type checkers read) and ``BUILTIN_LOSSES`` (what runs) are
    written separately: they must name the same losses."""
    import typing

    from training.sdk.losses import BUILTIN_LOSSES
    from training.sdk.types import LossFnType

    assert set(typing.get_args(LossFnType)) == set(BUILTIN_LOSSES)
