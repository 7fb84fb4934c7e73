"""LoRA adapters (peft) on the trainer's model: wrap, save, load, merge."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"

# The projections of every decoder block in Llama-style models (Qwen2/3, Llama, Mistral, ...):
# attention and MLP, as in the LoRA and QLoRA papers' best settings. Other architectures get
# their own block projections by the same rule (default_target_modules).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")
ATTENTION_PARTS = ("attn", "attention", "self_attn")
"""Module names whose projections are attention (``self_attn.q_proj``, GPT-2's
``attn.c_attn``); the other projections of a block are its MLP."""
UNEMBED_MODULES = ("lm_head",)


class LoraError(ValueError):
    """A LoRA setting or adapter does not fit the model."""


def _block_projections(model: torch.nn.Module) -> dict[str, str]:
    """Leaf name -> ``"attn"`` or ``"mlp"`` of every linear-like layer inside the model's
    repeated blocks (``layers.3.self_attn.q_proj``, GPT-2's ``h.3.mlp.c_fc`` Conv1D, Phi-3's
    fused ``qkv_proj`` / ``gate_up_proj``), in model order. MoE routers are left out: an
    adapter on the router would change which experts run."""
    from transformers.pytorch_utils import Conv1D

    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        parts = name.split(".")
        if not any(p.isdigit() for p in parts):  # not inside a numbered block (lm_head, ...)
            continue
        leaf = parts[-1]
        if leaf in ("gate", "router") and _is_router(model, module):
            continue
        kind = "attn" if any(p in ATTENTION_PARTS for p in parts[:-1]) else "mlp"
        found.setdefault(leaf, kind)
    return found


def _is_router(model: torch.nn.Module, module: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    return bool(experts) and getattr(module, "out_features", None) == experts


def _expert_parameters(model: torch.nn.Module) -> list[str]:
    """The fused expert weights of an MoE model's blocks, as peft ``target_parameters``
    (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``): transformers 5 keeps each
    layer's experts as 3-D ``[experts, out, in]`` parameters, not Linear layers."""
    found: dict[str, None] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if param.dim() != 3 or "experts" not in parts[:-1]:
            continue
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        if digits:  # relative to the block: "mlp.experts.gate_up_proj"
            found.setdefault(".".join(parts[digits[0] + 1:]))
    return list(found)


def _split_targets(model: torch.nn.Module, targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """``targets`` as peft's ``(target_modules, target_parameters)``: names of 3-D expert
    parameters go to the second."""
    experts = set(_expert_parameters(model))
    return ([t for t in targets if t not in experts], [t for t in targets if t in experts])


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """Every linear-like projection of the model's blocks, attention and MLP (for Llama-style
    models exactly :data:`DEFAULT_TARGET_MODULES`), and an MoE model's expert weights; see
    :func:`_block_projections` and :func:`_expert_parameters`."""
    found = list(_block_projections(model)) + _expert_parameters(model)
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        raise LoraError(f"{type(model).__name__} has no Linear or Conv1D layers inside its "
                        f"blocks to adapt; set lora_target_modules to names of its layers "
                        f"(e.g. {names[:6]})")
    return found


def lora_targets(model: torch.nn.Module, *, train_mlp: bool = True, train_attn: bool = True,
                 train_unembed: bool = True) -> list[str]:
    """Target modules for Tinker's ``create_lora_training_client`` switches: the model's
    attention projections, MLP projections and output layer (``lm_head``), as asked.

    A model whose output layer shares its weight with the input embedding
    (``tie_word_embeddings``) has no separate output layer: ``train_unembed`` adds nothing
    there (an adapter on the shared weight could not be merged into a deployment's weights).

    Raises:
        LoraError: every switch is off, or the model has none of the asked modules.
    """
    if not (train_mlp or train_attn or train_unembed):
        raise LoraError("train_mlp, train_attn and train_unembed are all False: the adapter "
                        "would train nothing")
    blocks = _block_projections(model)
    experts = _expert_parameters(model)
    wanted = tuple(leaf for leaf, kind in blocks.items()
                   if (kind == "attn" and train_attn) or (kind == "mlp" and train_mlp))
    wanted += tuple(experts) if train_mlp else ()
    wanted += UNEMBED_MODULES if train_unembed else ()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear)} | set(blocks) | set(experts)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        names -= set(UNEMBED_MODULES)
        if wanted == UNEMBED_MODULES:
            raise LoraError(f"{type(model).__name__} ties its output layer to the input "
                            f"embedding: train_unembed alone leaves nothing to adapt")
    found = [n for n in wanted if n in names]
    if not found:
        raise LoraError(f"{type(model).__name__} has none of the modules {wanted}; pass "
                        f"lora_target_modules to create_training_client instead")
    return found


def apply_lora(model: torch.nn.Module, rank: int, alpha: float | None = None,
               dropout: float = 0.0, target_modules: Sequence[str] | None = None,
               ) -> torch.nn.Module:
    """Wrap ``model`` in a peft LoRA model; only the adapter's A/B matrices stay trainable.

    ``alpha`` defaults to ``2 * rank`` (scale 2, a common default). peft initializes B to zero,
    so the wrapped model computes exactly what the base did until the first update. Targets
    naming an MoE model's fused expert weights (``mlp.experts.gate_up_proj``) get a rank-
    ``rank`` adapter per expert through peft's ``target_parameters``.
    """
    from peft import LoraConfig, get_peft_model

    if rank <= 0:
        raise LoraError(f"lora_rank must be > 0 to train an adapter, got {rank}")
    from transformers.pytorch_utils import Conv1D

    targets = list(target_modules) if target_modules else default_target_modules(model)
    modules, parameters = _split_targets(model, targets)
    if parameters and dropout:
        raise LoraError(f"lora_dropout={dropout} cannot apply to {type(model).__name__}'s "
                        f"expert weights {parameters} (peft adapts fused parameters without "
                        f"dropout): set lora_dropout to 0, or lora_target_modules without them")
    # GPT-2's Conv1D stores [in, out] weights: peft needs fan_in_fan_out for it.
    conv1d = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in modules
                 for n, m in model.named_modules())
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                        lora_dropout=dropout, target_modules=modules or None,
                        target_parameters=parameters or None, task_type="CAUSAL_LM",
                        fan_in_fan_out=conv1d)
    try:
        with warnings.catch_warnings():
            # peft asks transformers 5 by the deprecated name: noise in every run's log.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:
        raise LoraError(f"cannot apply LoRA to {targets}: {e}") from e


def is_lora_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the base model under a LoRA model (the frozen reference of a LoRA policy)."""
    with model.disable_adapter():
        yield


def save_adapter(model: torch.nn.Module, directory: str | Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained(base, directory)`` loads.

    ``state_dict``: the model's (trainable) weights as full tensors, when the model's own are
    sharded across ranks (FSDP2); by default they are read from ``model``."""
    # The base's embedding and output layers never change (an adapter on lm_head is its own
    # A/B): peft's "auto" would copy them into every adapter when lm_head is a target.
    model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict,
                          save_embedding_layers=False)


def load_adapter_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Load a PEFT adapter directory's weights into ``model``'s adapter (weights only)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    with _local_dir(str(directory)) as local:
        if not (Path(local) / ADAPTER_CONFIG_FILE).exists():
            raise LoraError(f"{directory} is not a PEFT adapter directory (no "
                            f"{ADAPTER_CONFIG_FILE})")
        weights = load_peft_weights(local, device="cpu")
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise LoraError(f"adapter {directory} does not fit this model: unexpected keys "
                        f"{unexpected[:5]} (was it trained on another base model, rank or "
                        f"target modules?)")


@contextlib.contextmanager
def _local_dir(path: str) -> Iterator[str]:
    """A local copy of a directory given as a local path or any fsspec URL."""
    if "://" not in path or path.startswith("file://"):
        yield path.removeprefix("file://")
        return
    import tempfile

    import fsspec

    fs, remote = fsspec.core.url_to_fs(path)
    with tempfile.TemporaryDirectory(prefix="homefire-adapter-") as tmp:
        fs.get(remote.rstrip("/") + "/", tmp, recursive=True)
        yield tmp


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  dtype: torch.dtype = torch.float32) -> None:
    """Merge an adapter into its base and save a plain transformers model at ``out_dir``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.sdk.hf_quiet import progress_bars_disabled

    with progress_bars_disabled():
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(str(out_dir), safe_serialization=True)
