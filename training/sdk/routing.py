"""Routing replay for mixture-of-experts models (seed 004): record which experts each token was
routed to in one forward pass, and make another forward pass use exactly those experts.

A *routing matrix* of a sequence is an int64 ``[tokens, moe_layers, top_k]`` tensor: for every
token and every MoE layer (in module order), the indices of the experts it was sent to. The
reference's ``forward`` returns one per datum (``loss_fn_outputs[i]["routing_matrices"]``) and
``DeploymentSampler.sample_with_tokens(..., include_routing_matrix=True)`` one per completion;
passed back as ``loss_fn_inputs["routing_matrices"]``, the training forward sends each token to
those experts. Only the *choice* is replayed: the gate weights of the chosen experts are
recomputed from the current router logits (softmax, then normalized over the chosen experts
where the model normalizes them), so the router still gets gradient.

Supported routers: those of Qwen3-MoE and Mixtral in ``transformers`` 5 (softmax over experts,
top-k, optional renormalization); another MoE architecture is refused by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["RoutingError", "capture_routing", "moe_routers", "replay_routing"]

_REPLAYABLE: dict[str, tuple[str | None, bool]] = {
    "Qwen3MoeTopKRouter": ("norm_topk_prob", True),
    "MixtralTopKRouter": (None, False),
}
"""Router classes whose replay is implemented: the attribute saying whether the chosen experts'
weights are renormalized (None: always, as in Mixtral), and whether the router casts them back
to its logits' dtype (Mixtral keeps them in fp32)."""


class RoutingError(ValueError):
    """A routing matrix does not fit the model, or the model's router cannot be replayed."""


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The expert routers of ``model`` in module order (empty for a dense model)."""
    return [m for m in model.modules()
            if type(m).__name__.endswith("Router") and hasattr(m, "top_k")
            and hasattr(m, "num_experts")]


@contextlib.contextmanager
def capture_routing(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record each router's expert indices during the forward passes inside the block: the
    yielded list gets one ``[tokens, top_k]`` tensor per router and forward pass, in call
    order."""
    captured: list[torch.Tensor] = []
    handles = [router.register_forward_hook(
        lambda _module, _args, output: captured.append(output[2].detach().cpu()))
        for router in moe_routers(model)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def replay_routing(model: torch.nn.Module, indices: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block, router ``l`` of ``model`` sends token ``t`` of the next forward pass to
    the experts ``indices[l][t]`` (``[tokens, top_k]`` int64 per router).

    Raises:
        RoutingError: the model has another number of routers, a router that cannot be replayed,
            or ``indices`` of the wrong shape or with an expert index out of range.
    """
    routers = moe_routers(model)
    if len(indices) != len(routers):
        raise RoutingError(f"routing matrices cover {len(indices)} MoE layers, the model has "
                           f"{len(routers)}")
    originals = []
    try:
        for router, chosen in zip(routers, indices, strict=True):
            name = type(router).__name__
            if name not in _REPLAYABLE:
                raise RoutingError(f"routing replay is not implemented for {name} (supported: "
                                   f"{', '.join(sorted(_REPLAYABLE))})")
            if chosen.dim() != 2 or chosen.shape[1] != router.top_k:
                raise RoutingError(f"routing matrix of {name} has shape {tuple(chosen.shape)}; "
                                   f"expected [tokens, top_k={router.top_k}]")
            if chosen.numel() and (int(chosen.min()) < 0
                                   or int(chosen.max()) >= router.num_experts):
                raise RoutingError(f"routing matrix names expert {int(chosen.max())} (or a "
                                   f"negative one); {name} has {router.num_experts} experts")
            originals.append((router, router.forward))
            router.forward = _replaying_forward(router, chosen, *_REPLAYABLE[name])
        yield
    finally:
        for router, forward in originals:
            router.forward = forward


def _replaying_forward(router: torch.nn.Module, chosen: torch.Tensor,
                       normalize_attr: str | None, cast: bool):
    def forward(hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        if hidden_states.shape[0] != chosen.shape[0]:
            raise RoutingError(f"routing matrix has {chosen.shape[0]} tokens, the forward pass "
                               f"{hidden_states.shape[0]}")
        logits = F.linear(hidden_states, router.weight)
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        index = chosen.to(probs.device)
        top = probs.gather(-1, index)
        if normalize_attr is None or getattr(router, normalize_attr):
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype) if cast else top, index
    return forward
