"""The forward passes behind ``forward``, ``forward_backward`` and
``forward_backward_custom``: datums to packed rows, the model call (data-parallel shards
under torchrun, MoE routing replay), per-datum logprobs or pooled embeddings, and the built-in
losses on them. A mixin of :class:`~training.sdk.training_client.TrainingClient`, whose
attributes (``model``, ``device``, ``tokenizer``, ``world``, ...) it uses."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from training.sdk import distributed
from training.sdk.distributed import collective
from training.sdk.lora import adapter_disabled
from training.sdk.losses import BUILTIN_LOSSES, check_loss_call, loss_tokens
from training.sdk.packed_attention import packed_attention
from training.sdk.packing import (
    PackedBatch,
    pack_routing,
    pack_sequences,
    unpack_routing,
)
from training.sdk.routing import capture_routing, moe_routers, replay_routing
from training.sdk.train_state import (  # StateCorruptError: its import path before the move
    StateCorruptError,  # noqa: F401
    )
from training.sdk.types import (
    Datum,
    ForwardBackwardOutput,
    Pooling,
    TensorData,
    as_datum,
)

logger = logging.getLogger(__name__)


def _position_inputs(index: int, datum: Datum, logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    """A datum's per-position ``loss_fn_inputs`` as float tensors shaped like its logprobs
    (a clip threshold may also be one value); ``target_tokens`` and ``routing_matrices`` are
    read elsewhere."""
    inputs = {}
    for key, value in datum.loss_fn_inputs.items():
        if key in ("target_tokens", "routing_matrices"):
            continue
        tensor = value.to_torch().to(logprobs.device, torch.float32)
        if tensor.numel() == logprobs.numel():
            tensor = tensor.reshape(logprobs.shape)
        elif not (tensor.numel() == 1 and key.startswith("clip_")):
            raise ValueError(f"datum {index}: loss_fn_inputs[{key!r}] has {tensor.numel()} "
                             f"entries, model_input has {logprobs.numel()} tokens; they must "
                             f"match")
        inputs[key] = tensor
    return inputs




class ForwardPasses:
    """Forward passes of a training client (see the module docstring)."""

    def _logprobs(self, datums: Sequence[Datum], *, require_targets: bool,
                  routing_out: list[torch.Tensor] | None = None,
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor | None]:
        """Per-datum log-probabilities (with grad if enabled), weights, and a graph anchor.

        With ``target_tokens``, entry j is ``log p(target_j | input_<=j)``. Without (weight-based
        datums), entry j is ``log p(token_j | tokens_<j)`` and entry 0 is 0.

        Under torchrun each rank runs the model on its contiguous share of the datums only and
        receives the other ranks' log-probs (detached): every rank then sees the whole batch, and
        a loss over it sends gradient through this rank's share alone, so the summed gradients
        of all ranks are exactly the gradient of that loss. The anchor (None for one process) is
        a zero that depends on every parameter this rank ran: add it to the loss so that each
        rank takes part in FSDP's gradient reduction even with no datum of its own.

        Datums with ``routing_matrices`` run with that expert routing (MoE models, see
        :mod:`training.sdk.routing`); ``routing_out`` (a list) receives each datum's own
        routing matrix (this rank's datums under torchrun).
        """
        if not datums:
            raise ValueError("no datums given")
        inputs, targets, shifted, weights, routing = self._prepare(datums, require_targets)
        per_datum, anchor = self._sharded(
            inputs, lambda share: self._run_model(
                inputs[share], targets[share], shifted[share],
                routing=None if routing is None else routing[share], routing_out=routing_out),
            lambda: self._run_model([[0]], [torch.zeros(1, dtype=torch.long)], [False]))
        return per_datum, weights, anchor

    def _embeddings(self, datums: Sequence[Datum], pooling: str,
                    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Per-datum pooled final hidden states ``[hidden_size]`` (fp32, with grad if enabled)
        and the graph anchor of :meth:`_logprobs` (same sharding under torchrun)."""
        if not datums:
            raise ValueError("no datums given")
        inputs = []
        for i, datum in enumerate(datums):
            tokens = datum.model_input.to_ints()
            if not tokens:
                raise ValueError(f"datum {i} has an empty model_input")
            inputs.append(tokens)
        return self._sharded(inputs, lambda share: self._run_embeddings(inputs[share], pooling),
                             lambda: self._run_embeddings([[0]], pooling))

    def _sharded(self, inputs: list[list[int]],
                 run_share: Callable[[slice], list[torch.Tensor]],
                 run_dummy: Callable[[], list[torch.Tensor]],
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``run_share(slice)`` over all datums (one process), or over this rank's share with
        the other ranks' results received detached (torchrun; see :meth:`_logprobs`)."""
        if not self.world.distributed:
            return run_share(slice(None)), None
        start, stop = distributed.shard_range(len(inputs), self.world)
        if start < stop:
            local = run_share(slice(start, stop))
            anchor = torch.stack([t.sum() for t in local]).sum() * 0.0
        else:  # fewer datums than ranks: run one token so FSDP's collectives still match
            local = []
            anchor = run_dummy()[0].sum() * 0.0
        shares = distributed.all_gather_object([t.detach().float().cpu() for t in local])
        per_datum: list[torch.Tensor] = []
        for rank, share in enumerate(shares):
            per_datum.extend(local if rank == self.world.rank
                             else [t.to(self.device) for t in share])
        return per_datum, anchor

    def _prepare(self, datums: Sequence[Datum], require_targets: bool,
                 ) -> tuple[list[list[int]], list[torch.Tensor], list[bool],
                            list[torch.Tensor | None], list[torch.Tensor] | None]:
        """Check every datum (on every rank, so all of them raise the same error) and unpack
        token ids, targets (shifted inputs for weight-only datums), weights and routing
        matrices (None when no datum has one)."""
        routing = self._routing_matrices(datums)
        inputs: list[list[int]] = []
        targets: list[torch.Tensor] = []
        shifted: list[bool] = []
        weights: list[torch.Tensor | None] = []
        for i, datum in enumerate(datums):
            tokens = datum.model_input.to_ints()
            if not tokens:
                raise ValueError(f"datum {i} has an empty model_input")
            inputs.append(tokens)
            w = datum.loss_fn_inputs.get("weights")
            if "target_tokens" in datum.loss_fn_inputs:
                tgt = datum.loss_fn_inputs["target_tokens"].to_torch().long().reshape(-1)
                if tgt.numel() != len(tokens):
                    raise ValueError(f"datum {i}: target_tokens has {tgt.numel()} entries, "
                                     f"model_input has {len(tokens)} tokens; they must match")
                targets.append(tgt)
                shifted.append(False)
            elif require_targets:
                raise ValueError(
                    f"datum {i} has no 'target_tokens' in loss_fn_inputs: the built-in "
                    f"'cross_entropy' loss needs them. Weight-only datums "
                    f"(datum_from_model_input_weights) work with forward_backward_custom.")
            else:
                targets.append(torch.tensor([*tokens[1:], 0], dtype=torch.long))
                shifted.append(True)
            if w is not None:
                w = w.to_torch().float().reshape(-1)
                if w.numel() != len(tokens):
                    raise ValueError(f"datum {i}: weights has {w.numel()} entries, model_input "
                                     f"has {len(tokens)} tokens; they must match")
            weights.append(w)
        return inputs, targets, shifted, weights, routing

    def _routing_matrices(self, datums: Sequence[Datum]) -> list[torch.Tensor] | None:
        """Each datum's ``routing_matrices`` as ``[tokens, moe_layers, top_k]`` int64 (all of
        them or none)."""
        given = ["routing_matrices" in d.loss_fn_inputs for d in datums]
        if not any(given):
            return None
        if not all(given):
            raise ValueError(f"datums {[i for i, g in enumerate(given) if not g]} have no "
                             f"routing_matrices but others do: give them to every datum of a "
                             f"call or to none")
        routers = moe_routers(self.model)
        if not routers:
            raise ValueError(f"routing_matrices given, but {self.base_model} has no "
                             f"mixture-of-experts layers to route")
        if self._token_logprobs is not self._eager_token_logprobs:
            raise ValueError("routing replay does not run under compile=True; create the "
                             "service without compile")
        matrices = []
        for i, datum in enumerate(datums):
            matrix = datum.loss_fn_inputs["routing_matrices"].to_torch().long()
            expected = (datum.model_input.length, len(routers), routers[0].top_k)
            if tuple(matrix.shape) != expected:
                raise ValueError(f"datum {i}: routing_matrices has shape {tuple(matrix.shape)}; "
                                 f"expected [tokens, moe_layers, top_k] = {list(expected)}")
            matrices.append(matrix)
        return matrices

    def _run_model(self, inputs: list[list[int]], targets: list[torch.Tensor],
                   shifted: list[bool], routing: list[torch.Tensor] | None = None,
                   routing_out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """One packed forward pass; the log-prob of each sequence's targets (with ``routing``,
        under those expert choices; ``routing_out`` receives each sequence's own)."""
        batch = self._pack(inputs, targets)
        mask = batch.attention_mask
        replay = (nullcontext() if routing is None
                  else replay_routing(self.model, pack_routing(routing, batch)))
        capture = (capture_routing(self.model) if routing_out is not None
                   else nullcontext(None))
        with self._forward_context(), replay, capture as captured:
            token_logprobs = self._token_logprobs(batch.input_ids.to(self.device),
                                                  batch.position_ids.to(self.device),
                                                  None if mask is None else mask.to(self.device),
                                                  batch.target_ids.to(self.device))
        if captured:
            routing_out.extend(unpack_routing(captured, batch))
        per_datum = []
        for i, (row, offset, length) in enumerate(batch.placements):
            lp = token_logprobs[row, offset:offset + length]
            if shifted[i]:
                lp = torch.cat([lp.new_zeros(1), lp[:-1]])
            per_datum.append(lp)
        return per_datum

    def _run_embeddings(self, inputs: list[list[int]], pooling: str) -> list[torch.Tensor]:
        """One packed forward pass; each sequence's final hidden states (after the last norm),
        mean-pooled or its last position's, in fp32."""
        batch = self._pack(inputs, [torch.zeros(len(t), dtype=torch.long) for t in inputs])
        mask = batch.attention_mask
        with self._forward_context():
            # logits_to_keep=1: the vocabulary projection runs for one position only.
            hidden = self.model(input_ids=batch.input_ids.to(self.device),
                                position_ids=batch.position_ids.to(self.device),
                                attention_mask=None if mask is None else mask.to(self.device),
                                output_hidden_states=True, logits_to_keep=1,
                                use_cache=False).hidden_states[-1]
        pooled = []
        for row, offset, length in batch.placements:
            span = hidden[row, offset:offset + length].float()
            pooled.append(span.mean(dim=0) if pooling == Pooling.mean else span[-1])
        return pooled

    def _pack(self, inputs: list[list[int]], targets: list[torch.Tensor]) -> PackedBatch:
        return pack_sequences(inputs, targets, pad_id=self.tokenizer.pad_token_id or 0,
                              attention_cost=self._attention_cost,
                              per_document_attention=self._per_document_attention)

    @contextmanager
    def _forward_context(self) -> Iterator[None]:
        """What every forward pass runs under: the adapter switched off for a LoRA reference,
        per-document attention, a collective's error handling and bf16 autocast."""
        adapter_off = adapter_disabled(self.model) if self.adapter_disabled else nullcontext()
        attention = (packed_attention(self.model) if self._per_document_attention
                     else nullcontext())
        with adapter_off, attention, collective("running the forward pass"), torch.autocast(
                self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                enabled=self.autocast_dtype is not None):
            yield

    def _builtin_loss(self, data: Sequence[Any], loss_fn: str,
                      loss_fn_config: dict[str, Any] | None,
                      ) -> tuple[torch.Tensor, ForwardBackwardOutput]:
        """The summed loss of a built-in loss (:mod:`training.sdk.losses`) and its output."""
        datums = [as_datum(d) for d in data]
        config = check_loss_call(loss_fn, loss_fn_config, [d.loss_fn_inputs for d in datums])
        per_position = BUILTIN_LOSSES[loss_fn].per_position
        # An MoE model's forward passes report their routing (the reference's, for replay).
        routing: list[torch.Tensor] | None = (
            [] if moe_routers(self.model) and not self.world.distributed else None)
        logprobs, _, anchor = self._logprobs(datums, require_targets=True, routing_out=routing)
        loss = logprobs[0].new_zeros(()) if anchor is None else anchor
        tokens = 0
        for i, (datum, lp) in enumerate(zip(datums, logprobs, strict=True)):
            inputs = _position_inputs(i, datum, lp)
            loss = loss + per_position(lp, inputs, config).sum()
            tokens += loss_tokens(loss_fn, inputs, lp.numel())
        output = ForwardBackwardOutput(
            loss_fn_output_type=loss_fn,
            loss_fn_outputs=[
                {"logprobs": TensorData.from_torch(lp.detach().float()),
                 **({"routing_matrices": TensorData.from_torch(routing[i])} if routing else {})}
                for i, lp in enumerate(logprobs)],
            metrics={"loss:sum": float(loss.detach()), "num_loss_tokens": float(tokens),
                     "num_sequences": float(len(datums))},
        )
        return loss, output
