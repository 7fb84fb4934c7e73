"""Losses on sequence log-probabilities: the one home for the recipes' objectives.

Pure functions on tensors, no model or client: a recipe computes per-sequence log-probs inside
``forward_backward_custom`` (``training.utils.preference_data.sequence_logprobs``) and hands them
here. All log-probabilities are natural-log sums over a sequence's completion tokens (nats),
shape ``[pairs]``; every function returns per-pair losses so callers choose the reduction.

Preference losses:

* :func:`dpo_loss`: DPO (Rafailov et al., 2023) with ``loss_type`` ``"sigmoid"`` (the paper's),
  ``"ipo"`` (Azar et al., 2023) or ``"hinge"`` (SLiC, Zhao et al., 2023), against a frozen
  reference model.
* :func:`orpo_loss`: ORPO (Hong et al., 2024): NLL on the chosen answer plus an odds-ratio
  penalty, no reference model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.sdk.choices import Choice


class DPOLossType(Choice):
    """The DPO objective (``loss_type``) of :func:`dpo_loss`."""

    sigmoid = "sigmoid"
    """The DPO paper's ``-log sigmoid(beta * margin)``."""
    ipo = "ipo"
    """IPO: ``(margin - 1 / (2 beta))^2``, which does not push the margin to infinity."""
    hinge = "hinge"
    """SLiC's ``max(0, 1 - beta * margin)``."""


DPO_LOSS_TYPES = DPOLossType.values()

# ORPO takes log(1 - p) of an average token probability p = exp(avg_logp); p rounds to 1 (and
# the log to -inf) once avg_logp is within float32 epsilon of 0. Capping avg_logp keeps the
# loss finite with a zero gradient there, where the model is already certain of the answer.
_ORPO_MAX_AVG_LOGP = -1e-6


@dataclass
class PreferenceLossOutput:
    """Per-pair losses and implicit rewards of a batch of preference pairs."""

    losses: torch.Tensor
    """``[pairs]`` loss of each pair (differentiable)."""
    chosen_rewards: torch.Tensor
    """``[pairs]`` implicit reward of the chosen completion (detached). DPO:
    ``beta * (policy_logp - reference_logp)`` in nats; ORPO: ``lambda * average token logp``."""
    rejected_rewards: torch.Tensor
    """``[pairs]`` implicit reward of the rejected completion (detached)."""
    extra_metrics: dict[str, float] | None = None
    """Loss-specific batch means (ORPO's ``nll_loss``, ``odds_ratio_loss``, ...)."""

    @property
    def loss(self) -> torch.Tensor:
        """Mean loss over the pairs: the scalar to differentiate."""
        return self.losses.mean()

    def metrics(self) -> dict[str, float]:
        """Batch means: ``loss``; ``preference_accuracy`` (fraction of pairs whose chosen reward
        is strictly higher, 0..1); ``reward_margin`` (chosen minus rejected reward);
        ``chosen_reward`` and ``rejected_reward``; plus :attr:`extra_metrics`."""
        chosen, rejected = self.chosen_rewards.float(), self.rejected_rewards.float()
        return {
            "loss": float(self.losses.detach().mean()),
            "preference_accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean()),
            "chosen_reward": float(chosen.mean()),
            "rejected_reward": float(rejected.mean()),
            **(self.extra_metrics or {}),
        }


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, *,
             beta: float, loss_type: str = "sigmoid") -> PreferenceLossOutput:
    """Direct preference optimization loss of each pair.

    With ``h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)`` (the
    difference of the two log-ratios, nats):

    * ``sigmoid``: ``-log sigmoid(beta * h)`` (DPO, eq. 7 of the paper);
    * ``ipo``: ``(h - 1 / (2 * beta))**2`` (IPO, eq. 17; on sequence sums, as in the paper,
      where TRL divides each log-prob by the completion length first);
    * ``hinge``: ``max(0, 1 - beta * h)`` (SLiC's calibration loss).

    Args:
        policy_chosen_logps: ``[pairs]`` log-probs of the chosen completions under the policy.
        policy_rejected_logps: ``[pairs]`` same for the rejected completions.
        reference_chosen_logps: ``[pairs]`` log-probs of the chosen completions under the frozen
            reference (no gradient flows into them).
        reference_rejected_logps: ``[pairs]`` same for the rejected completions.
        beta: strength of the implicit KL penalty (> 0; 0.1 is the paper's default): larger
            keeps the policy closer to the reference. For ``ipo`` it sets the target margin
            ``1 / (2 * beta)``.
        loss_type: one of :data:`DPO_LOSS_TYPES`.

    Returns:
        Per-pair losses and rewards ``beta * (policy - reference)`` of each side.

    Raises:
        ValueError: unknown ``loss_type``, ``beta <= 0`` or mismatched shapes.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps,
                                reference_chosen_logps, reference_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"log-prob tensors must share one [pairs] shape, got {sorted(shapes)}")
    reference_chosen = reference_chosen_logps.detach().to(policy_chosen_logps)
    reference_rejected = reference_rejected_logps.detach().to(policy_rejected_logps)
    chosen_logratio = policy_chosen_logps - reference_chosen
    rejected_logratio = policy_rejected_logps - reference_rejected
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return PreferenceLossOutput(losses=losses,
                                chosen_rewards=beta * chosen_logratio.detach(),
                                rejected_rewards=beta * rejected_logratio.detach())


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler, 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *,
              orpo_lambda: float) -> PreferenceLossOutput:
    """Odds-ratio preference optimization loss of each pair (no reference model).

    With ``P(y) = exp(logp(y) / |y|)`` the length-normalized likelihood of a completion and
    ``odds(y) = P(y) / (1 - P(y))``, the loss of a pair is (eq. 6 of the paper)::

        -logp(chosen) / |chosen|  -  lambda * log sigmoid(log(odds(chosen) / odds(rejected)))

    the chosen answer's mean token NLL (the SFT term) plus the odds-ratio term.

    Args:
        chosen_logps: ``[pairs]`` summed log-probs (nats) of the chosen completions.
        rejected_logps: ``[pairs]`` summed log-probs of the rejected completions.
        chosen_tokens: ``[pairs]`` completion lengths ``|y|`` in tokens (sum of loss weights).
        rejected_tokens: ``[pairs]`` same for the rejected completions.
        orpo_lambda: weight of the odds-ratio term (> 0; the paper uses 0.1 to 1).

    Returns:
        Per-pair losses; rewards ``lambda * logp / |y|``; extra metrics ``nll_loss``,
        ``odds_ratio_loss`` (the mean of ``-log sigmoid(log odds ratio)``, before ``lambda``) and
        ``log_odds_ratio``.

    Raises:
        ValueError: ``orpo_lambda <= 0``, mismatched shapes, or a completion of 0 tokens.
    """
    if not orpo_lambda > 0:
        raise ValueError(f"orpo_lambda must be > 0, got {orpo_lambda}")
    shapes = {t.shape for t in (chosen_logps, rejected_logps, chosen_tokens, rejected_tokens)}
    if len(shapes) != 1:
        raise ValueError(f"tensors must share one [pairs] shape, got {sorted(shapes)}")
    if bool((chosen_tokens <= 0).any()) or bool((rejected_tokens <= 0).any()):
        raise ValueError("every completion needs at least one trained token (tokens > 0)")
    chosen_avg = chosen_logps / chosen_tokens.to(chosen_logps)
    rejected_avg = rejected_logps / rejected_tokens.to(rejected_logps)
    chosen_capped = chosen_avg.clamp(max=_ORPO_MAX_AVG_LOGP)
    rejected_capped = rejected_avg.clamp(max=_ORPO_MAX_AVG_LOGP)
    log_odds_ratio = ((chosen_capped - _log1m_exp(chosen_capped))
                      - (rejected_capped - _log1m_exp(rejected_capped)))
    odds_ratio_losses = -F.logsigmoid(log_odds_ratio)
    nll = -chosen_avg
    return PreferenceLossOutput(
        losses=nll + orpo_lambda * odds_ratio_losses,
        chosen_rewards=orpo_lambda * chosen_avg.detach(),
        rejected_rewards=orpo_lambda * rejected_avg.detach(),
        extra_metrics={"nll_loss": float(nll.detach().mean()),
                       "odds_ratio_loss": float(odds_ratio_losses.detach().mean()),
                       "log_odds_ratio": float(log_odds_ratio.detach().mean())})
