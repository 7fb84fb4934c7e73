"""The built-in losses of ``forward`` / ``forward_backward``, with Tinker's names and semantics.

Every loss is a sum over the positions of every datum (never a mean: ``optim_step``'s
``grad_accumulation_normalization`` turns it into one). Position ``i`` of ``loss_fn_inputs``
belongs to position ``i`` of ``model_input``, whose prediction is ``target_tokens[i]``; ``lp`` is
``log p_theta(target_tokens[i] | model_input[:i+1])`` (with grad), ``q`` the sampler's logprob of
the same token (``loss_fn_inputs["logprobs"]``), ``A`` the advantage and ``ratio = exp(lp - q)``:

================== ==================================================== =======================
loss               per-position loss                                    ``loss_fn_config``
================== ==================================================== =======================
cross_entropy      ``-weights * lp`` (weights default to 1)             none
importance_sampling ``-ratio * A``                                      none
ppo                ``-min(ratio * A, clip(ratio, low, high) * A)``      ``clip_low_threshold``
                                                                        0.8, ``..._high..`` 1.2
cispo              ``-sg(clip(ratio, low, high)) * lp * A``             low 0.0, high 4.0
dro                ``-(lp * A - beta / 2 * (lp - q) ** 2)``             ``beta`` 0.05
gspo               as ppo with every position's ratio replaced by the   low ``1 - 3e-4``,
                   sequence ratio ``exp(mean over the masked positions  high ``1 + 4e-4``
                   of (sg(lp) - q))`` times ``exp(lp - sg(lp))``
================== ==================================================== =======================

(``sg``: stop-gradient. ``gspo`` is GSPO-token as Tinker implements it: the mask is
``loss_fn_inputs["sequence_ratio_mask"] != 0``, by default the positions with a non-zero
advantage. The clip thresholds may also be given per datum in ``loss_fn_inputs``, per position
or as one value. Tinker documents ``beta=0.05`` as an example for ``dro``; it is our default.)

A datum's ``loss_fn_inputs`` may hold only the keys its loss reads (plus ``routing_matrices``,
which replays an MoE model's expert routing under any loss: :mod:`training.sdk.routing`): a
misspelled key (``wieghts``) is refused, not ignored. Custom losses (``forward_backward_custom``)
get every key as it is (``routing_matrices`` is replayed there too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["BUILTIN_LOSSES", "BuiltinLoss", "check_loss_call", "loss_tokens"]


@dataclass(frozen=True)
class BuiltinLoss:
    """One built-in loss: the ``loss_fn_inputs`` it reads and its ``loss_fn_config`` keys."""

    name: str
    required: tuple[str, ...]
    """Keys every datum must have (besides ``target_tokens``, which all of them need)."""
    optional: tuple[str, ...] = ()
    config: Mapping[str, float] = field(default_factory=dict)
    """``loss_fn_config`` keys and their defaults."""
    per_position: Callable[..., torch.Tensor] | None = None
    """``(lp, inputs, config) -> [positions]`` losses of one datum (see the module table)."""

    @property
    def accepted(self) -> tuple[str, ...]:
        return ("target_tokens", *self.required, *self.optional, "routing_matrices")


def _cross_entropy(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                   config: Mapping[str, float]) -> torch.Tensor:
    weights = inputs.get("weights")
    return -lp if weights is None else -weights * lp


def _importance_sampling(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                         config: Mapping[str, float]) -> torch.Tensor:
    return -torch.exp(lp - inputs["logprobs"]) * inputs["advantages"]


def _thresholds(inputs: Mapping[str, torch.Tensor], config: Mapping[str, float],
                ) -> tuple[Any, Any]:
    """Clip thresholds: per-datum ``loss_fn_inputs`` values win over ``loss_fn_config``."""
    return (inputs.get("clip_low_threshold", config["clip_low_threshold"]),
            inputs.get("clip_high_threshold", config["clip_high_threshold"]))


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, low: Any,
                       high: Any) -> torch.Tensor:
    clipped = torch.clamp(ratio, low, high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def _ppo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor],
         config: Mapping[str, float]) -> torch.Tensor:
    return _clipped_surrogate(torch.exp(lp - inputs["logprobs"]), inputs["advantages"],
                              *_thresholds(inputs, config))


def _cispo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor],
           config: Mapping[str, float]) -> torch.Tensor:
    ratio = torch.exp(lp.detach() - inputs["logprobs"])
    return -torch.clamp(ratio, *_thresholds(inputs, config)) * lp * inputs["advantages"]


def _dro(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor],
         config: Mapping[str, float]) -> torch.Tensor:
    quadratic = (lp - inputs["logprobs"]) ** 2
    return -(lp * inputs["advantages"] - 0.5 * config["beta"] * quadratic)


def _gspo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor],
          config: Mapping[str, float]) -> torch.Tensor:
    mask = inputs.get("sequence_ratio_mask")
    in_ratio = (mask if mask is not None else inputs["advantages"]) != 0
    log_ratio = ((lp.detach() - inputs["logprobs"])[in_ratio].mean() if in_ratio.any()
                 else lp.new_zeros(()))
    ratio = torch.exp(log_ratio + lp - lp.detach())
    return _clipped_surrogate(ratio, inputs["advantages"], *_thresholds(inputs, config))


_CLIP = ("clip_low_threshold", "clip_high_threshold")
_RL = ("logprobs", "advantages")

BUILTIN_LOSSES: dict[str, BuiltinLoss] = {loss.name: loss for loss in (
    BuiltinLoss("cross_entropy", (), ("weights",), {}, _cross_entropy),
    BuiltinLoss("importance_sampling", _RL, (), {}, _importance_sampling),
    BuiltinLoss("ppo", _RL, _CLIP, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
                _ppo),
    BuiltinLoss("cispo", _RL, _CLIP, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
                _cispo),
    BuiltinLoss("dro", _RL, (), {"beta": 0.05}, _dro),
    BuiltinLoss("gspo", _RL, (*_CLIP, "sequence_ratio_mask"),
                {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}, _gspo),
)}
"""Every built-in loss by its Tinker name."""


def check_loss_call(loss_fn: str, loss_fn_config: Mapping[str, Any] | None,
                    inputs_per_datum: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Check a built-in loss call before any compute; returns the resolved config.

    Raises:
        ValueError: an unknown loss, an unknown or non-numeric ``loss_fn_config`` key, or a
            datum whose ``loss_fn_inputs`` lacks a key the loss reads or has one it does not
            (named with the datum's index).
    """
    loss = BUILTIN_LOSSES.get(loss_fn)
    if loss is None:
        raise ValueError(f"unknown loss {loss_fn!r}: built-in losses are "
                         f"{sorted(BUILTIN_LOSSES)}; use forward_backward_custom for your own")
    config = dict(loss.config)
    for key, value in (loss_fn_config or {}).items():
        if key not in loss.config:
            raise ValueError(f"loss_fn_config key {key!r} is not used by loss {loss_fn!r} "
                             f"(it takes {sorted(loss.config) or 'no config'})")
        try:
            config[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"loss_fn_config[{key!r}] must be a number, got {value!r}") from None
    for i, inputs in enumerate(inputs_per_datum):
        missing = [k for k in ("target_tokens", *loss.required) if k not in inputs]
        if missing:
            hint = (" Weight-only datums (datum_from_model_input_weights) work with "
                    "forward_backward_custom." if "target_tokens" in missing else "")
            raise ValueError(f"datum {i}: loss {loss_fn!r} needs loss_fn_inputs {missing} "
                             f"(it reads {list(loss.accepted)}).{hint}")
        unknown = sorted(set(inputs) - set(loss.accepted))
        if unknown:
            raise ValueError(f"datum {i}: loss_fn_inputs key(s) {unknown} are not read by loss "
                             f"{loss_fn!r}, which reads {list(loss.accepted)}: a "
                             f"misspelling? (forward_backward_custom passes any key to your "
                             f"loss)")
    return config


def loss_tokens(loss_fn: str, inputs: Mapping[str, torch.Tensor], positions: int) -> int:
    """Positions that count as loss tokens for ``GradAccNormalization.NUM_LOSS_TOKENS``:
    non-zero weight (cross_entropy; all positions without weights) or non-zero advantage."""
    if loss_fn == "cross_entropy":
        weights = inputs.get("weights")
        return positions if weights is None else int((weights != 0).sum())
    return int((inputs["advantages"] != 0).sum())
