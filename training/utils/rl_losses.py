"""RL policy-gradient losses and group-relative advantages: the one home for the RL objectives.

(Preference losses live in :mod:`training.utils.losses`; these are kept apart because they take
per-token inputs and a sampling policy, not per-sequence sums.)

Pure functions on tensors, no model or client. Every log-probability is a natural log (nats)
of one sampled completion token; each sequence's tensors are 1-D over its completion tokens
only (the prompt is not trained). Three policies appear:

* ``logprobs``: the policy being trained, ``log pi_theta`` (with grad);
* ``old_logprobs``: the trainer's log-probs under the weights that sampled the tokens,
  ``log pi_old`` (no grad). On-policy (weights unchanged since sampling) it is
  ``logprobs.detach()``; when the trainer no longer has those weights (off-policy), pass the
  sampling log-probs and the truncated-IS weight below becomes 1;
* ``sampling_logprobs``: what the inference engine reported when it sampled, ``log mu``. The
  engine computes them with other kernels (and often another precision) than the trainer, so
  ``mu != pi_old`` even on-policy.

With ``r = pi_theta / pi_old`` and advantage ``A`` of the sequence, the per-token loss of each
method (:data:`RL_LOSSES`) is:

* ``grpo``: ``-w * min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)``: PPO's clipped
  surrogate (GRPO, Shao et al., 2024) times the truncated importance-sampling weight
  ``w = min(pi_old / mu, tis_cap)`` (no grad) that corrects for the trainer/inference mismatch
  (Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy RL training").
* ``dapo``: the same with DAPO's decoupled, asymmetric clip (Yu et al., 2025): default
  ``eps_high = 0.28 > eps_low = 0.2`` lets low-probability tokens grow.
* ``gspo``: sequence-level ratio ``s = exp(mean_t(log pi_theta - log pi_old))`` and weight
  ``w = min(exp(mean_t(log pi_old - log mu)), tis_cap)`` (GSPO, Zheng et al., 2025): the
  sequence's loss ``-w * min(s * A, clip(s) * A)`` is spread evenly over its tokens (each gets
  ``1 / |y|`` of it), so a sequence's token losses sum to its GSPO loss. Default clip
  ``3e-4 / 4e-4`` (sequence ratios stay much closer to 1 than token ratios).
* ``cispo``: ``-clip(sg(pi_theta / mu), 1 - eps_low, 1 + eps_high) * A * log pi_theta``: a
  REINFORCE gradient with a truncated, stop-gradient importance weight against the sampling
  policy, so no token's gradient is ever clipped to zero (CISPO, MiniMax-M1, 2025). Default
  ``eps_low = 1`` (no lower bound) and ``eps_high = 3`` (weights capped at 4). ``tis_cap``
  does not apply: the weight already is a truncated IS ratio.
* ``importance_sampling``: ``-(pi_theta / mu) * A``, unclipped (Tinker's
  ``importance_sampling`` loss).

An optional KL penalty to a frozen reference adds ``kl_beta * k3`` per token, with Schulman's
``k3 = exp(ref - logp) - (ref - logp) - 1`` estimator of ``KL(pi_theta || pi_ref)`` (non-negative,
unbiased on samples of ``pi_theta``; the GRPO paper's choice).

:func:`policy_loss` returns the *sum* of the per-token losses of all sequences; the training
client's ``grad_accumulation_normalization`` then makes it a mean over loss tokens (DAPO's
token-level mean), over sequences (``num_sequences``: for ``gspo`` exactly the paper's mean over
sequences) or leaves it a sum (``none``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from training.sdk.choices import Choice


class RLLoss(Choice):
    """The RL objective (``rl_loop``'s ``loss``): formulas in this module's docstring."""

    grpo = "grpo"
    """PPO-style clipped ratio per token, group-normalized advantages."""
    dapo = "dapo"
    """GRPO with DAPO's decoupled, asymmetric clip."""
    gspo = "gspo"
    """A sequence-level (length-normalized) importance ratio, clipped."""
    cispo = "cispo"
    """The clipped, stop-gradient IS weight times ``log pi``."""
    importance_sampling = "importance_sampling"
    """Unclipped importance sampling (Tinker's built-in of that name)."""
    ppo = "ppo"
    """Tinker's built-in ``ppo`` loss, run by the training client."""
    dro = "dro"
    """Tinker's built-in ``dro`` loss (``dro_beta``), run by the training client."""


RL_LOSSES = ("grpo", "dapo", "gspo", "cispo", "importance_sampling")
"""Values of ``loss`` that :func:`policy_loss` computes (``ppo`` and ``dro`` are the training
client's built-ins)."""

DEFAULT_CLIP: dict[str, tuple[float, float]] = {
    "grpo": (0.2, 0.2),
    "dapo": (0.2, 0.28),
    "gspo": (3e-4, 4e-4),
    "cispo": (1.0, 3.0),
    "importance_sampling": (0.0, 0.0),  # unclipped: unused
}
"""``(eps_low, eps_high)`` of each loss when the config leaves them unset."""


@dataclass
class GroupAdvantages:
    """Group-normalized advantages of a batch of groups (one group per prompt)."""

    advantages: torch.Tensor
    """``[groups, group_size]`` float32: ``(r - group mean) / (group std + eps)`` (or without the
    division when not scaling by std); 0 for dropped groups."""
    keep: torch.Tensor
    """``[groups]`` bool: False for groups whose rewards are all equal (zero variance: every
    advantage is 0, so they carry no gradient and are dropped from training)."""

    @property
    def num_filtered(self) -> int:
        """Groups dropped for zero reward variance."""
        return int((~self.keep).sum())


def group_advantages(rewards: torch.Tensor, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> GroupAdvantages:
    """GRPO's group-relative advantages of ``rewards`` ``[groups, group_size]``.

    ``A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps)`` with the population standard deviation
    (divide by ``group_size``), or ``r_ij - mean_j r_ij`` when ``scale_by_std`` is False (Dr.
    GRPO, Liu et al., 2025, drops the division because it up-weights nearly-solved prompts).
    A group whose rewards are all equal (max - min <= 1e-12) is dropped (``keep`` False).

    Raises:
        ValueError: ``rewards`` is not 2-D with at least 2 samples per group.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, group_size >= 2], got shape "
                         f"{tuple(rewards.shape)}: a group of one has no baseline")
    rewards = rewards.double()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    keep = (rewards.max(dim=1).values - rewards.min(dim=1).values) > 1e-12
    advantages = torch.where(keep[:, None], centered, torch.zeros_like(centered))
    return GroupAdvantages(advantages=advantages.float(), keep=keep)


@dataclass
class PolicyLossOutput:
    """The loss of a batch of sampled sequences and its diagnostics."""

    loss: torch.Tensor
    """Scalar: the sum of every completion token's loss (differentiate this)."""
    num_tokens: int
    """Completion tokens in the batch."""
    clip_fraction: float
    """Fraction of tokens (0..1) whose gradient the clip changed: for PPO-style losses the
    clipped branch of the min was taken (zero gradient); for ``cispo`` the IS weight was
    truncated; 0 for ``importance_sampling``."""
    tis_clip_fraction: float
    """Fraction of tokens whose truncated-IS weight hit ``tis_cap`` (grpo, dapo, gspo)."""
    kl: float
    """Mean per-token k3 estimate of ``KL(pi_theta || pi_ref)`` (nats); 0 with no reference."""
    ratio_mean: float
    """Mean per-token ``pi_theta / mu`` (1 when trainer and sampler agree exactly)."""

    def metrics(self) -> dict[str, float]:
        return {"loss_sum": float(self.loss.detach()), "clip_fraction": self.clip_fraction,
                "tis_clip_fraction": self.tis_clip_fraction, "kl": self.kl,
                "ratio_mean": self.ratio_mean}


def resolve_clip(loss: str, eps_low: float | None, eps_high: float | None,
                 ) -> tuple[float, float]:
    """``(eps_low, eps_high)``: the given values, else :data:`DEFAULT_CLIP` of ``loss``; a given
    ``eps_low`` with no ``eps_high`` is symmetric except for ``dapo`` and ``cispo``."""
    if loss not in RL_LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {', '.join(RL_LOSSES)}")
    default_low, default_high = DEFAULT_CLIP[loss]
    low = default_low if eps_low is None else eps_low
    if eps_high is None:
        eps_high = low if eps_low is not None and loss not in ("dapo", "cispo") else default_high
    return low, eps_high


def policy_loss(logprobs: Sequence[torch.Tensor], old_logprobs: Sequence[torch.Tensor],
                sampling_logprobs: Sequence[torch.Tensor], advantages: torch.Tensor, *,
                loss: str = "grpo", clip_eps_low: float | None = None,
                clip_eps_high: float | None = None, tis_cap: float = 2.0,
                reference_logprobs: Sequence[torch.Tensor] | None = None,
                kl_beta: float = 0.0) -> PolicyLossOutput:
    """The RL loss of a batch of sampled sequences (see the module docstring for each formula).

    Args:
        logprobs: per sequence, ``[tokens]`` log pi_theta of its completion tokens (with grad).
        old_logprobs: same shapes, log pi_old (detached here).
        sampling_logprobs: same shapes, log mu from the inference engine.
        advantages: ``[sequences]`` advantage of each sequence (no grad).
        loss: one of :data:`RL_LOSSES`.
        clip_eps_low, clip_eps_high: clip range ``[1 - low, 1 + high]``; None takes the loss's
            default (:func:`resolve_clip`).
        tis_cap: cap ``C`` of the truncated importance-sampling weight ``min(pi_old / mu, C)``;
            0 disables the correction (weight 1). Typical: 2.
        reference_logprobs: same shapes, log-probs under the frozen reference (needed when
            ``kl_beta > 0``).
        kl_beta: weight of the per-token k3 KL penalty (0 = none).

    Raises:
        ValueError: unknown loss, mismatched lengths, or ``kl_beta > 0`` without reference
            log-probs.
    """
    low, high = resolve_clip(loss, clip_eps_low, clip_eps_high)
    n = len(logprobs)
    if not (len(old_logprobs) == len(sampling_logprobs) == advantages.numel() == n) or n == 0:
        raise ValueError(f"need one entry per sequence: {n} logprobs, {len(old_logprobs)} "
                         f"old_logprobs, {len(sampling_logprobs)} sampling_logprobs, "
                         f"{advantages.numel()} advantages (and at least one sequence)")
    if kl_beta > 0 and (reference_logprobs is None or len(reference_logprobs) != n):
        raise ValueError("kl_beta > 0 needs reference_logprobs, one tensor per sequence")
    total = logprobs[0].new_zeros((), dtype=torch.float32)
    num_tokens = clipped = tis_clipped = 0
    kl_sum = ratio_sum = 0.0
    for i in range(n):
        lp = logprobs[i].float()
        old = old_logprobs[i].detach().to(lp)
        mu = sampling_logprobs[i].detach().to(lp)
        if not (lp.shape == old.shape == mu.shape) or lp.dim() != 1:
            raise ValueError(f"sequence {i}: logprobs {tuple(lp.shape)}, old_logprobs "
                             f"{tuple(old.shape)} and sampling_logprobs {tuple(mu.shape)} must "
                             f"be equal 1-D shapes")
        a = advantages[i].detach().to(lp)
        tokens = lp.numel()
        if tokens == 0:
            continue
        if loss in ("grpo", "dapo"):
            raw_w = torch.exp(old - mu)
            w = raw_w.clamp(max=tis_cap) if tis_cap > 0 else torch.ones_like(raw_w)
            ratio = torch.exp(lp - old)
            surrogate = torch.minimum(ratio * a, ratio.clamp(1 - low, 1 + high) * a)
            token_loss = -w * surrogate
            clipped += int((((ratio > 1 + high) & (a > 0)) | ((ratio < 1 - low) & (a < 0))).sum())
            tis_clipped += int((raw_w > tis_cap).sum()) if tis_cap > 0 else 0
        elif loss == "gspo":
            raw_w = torch.exp((old - mu).mean())
            w = raw_w.clamp(max=tis_cap) if tis_cap > 0 else torch.ones_like(raw_w)
            ratio = torch.exp((lp - old).mean())
            surrogate = torch.minimum(ratio * a, ratio.clamp(1 - low, 1 + high) * a)
            token_loss = (-w * surrogate / tokens).expand(tokens)
            is_clipped = bool((ratio > 1 + high) & (a > 0) | (ratio < 1 - low) & (a < 0))
            clipped += tokens * is_clipped
            tis_clipped += tokens * bool(tis_cap > 0 and raw_w > tis_cap)
        elif loss == "cispo":
            raw = torch.exp(lp.detach() - mu)
            weight = raw.clamp(max(0.0, 1 - low), 1 + high)
            token_loss = -weight * a * lp
            clipped += int((weight != raw).sum())
        else:  # importance_sampling
            token_loss = -torch.exp(lp - mu) * a
        if kl_beta > 0:
            delta = reference_logprobs[i].detach().to(lp) - lp
            k3 = torch.exp(delta) - delta - 1
            token_loss = token_loss + kl_beta * k3
            kl_sum += float(k3.detach().sum())
        elif reference_logprobs is not None:
            delta = reference_logprobs[i].detach().to(lp) - lp.detach()
            kl_sum += float((torch.exp(delta) - delta - 1).sum())
        total = total + token_loss.sum()
        num_tokens += tokens
        ratio_sum += float(torch.exp(lp.detach() - mu).sum())
    denominator = max(num_tokens, 1)
    return PolicyLossOutput(loss=total, num_tokens=num_tokens,
                            clip_fraction=clipped / denominator,
                            tis_clip_fraction=tis_clipped / denominator,
                            kl=kl_sum / denominator, ratio_mean=ratio_sum / denominator)
