"""Where model weights and tokenizers come from.

``base_model`` / ``tokenizer_model`` accept, in this order of precedence:

1. a built-in tiny model name (``homefire/tiny-qwen3``, ...; built offline on first use);
2. a local directory in Hugging Face format;
3. a promoted model of the local registry, ``accounts/<account>/models/<id>``;
4. a Hugging Face hub id, loaded with the standard ``from_pretrained`` path (needs the hub or a
   populated HF cache).
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from training.sdk.hf_quiet import progress_bars_disabled
from training.sdk.names import parse_model_name
from training.sdk.store import CheckpointStore
from training.sdk.tiny_model import TINY_MODELS, ensure_tiny_model, is_tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")
"""Files of which a local tokenizer directory must hold at least one."""


class ModelLoadError(ValueError):
    """A base model or tokenizer could not be found or loaded."""


@contextmanager
def model_source(name: str, store: CheckpointStore | None = None) -> Iterator[str]:
    """Yield something ``from_pretrained`` accepts (a local directory or a hub id) for ``name``."""
    if not name:
        raise ModelLoadError("no model given: set base_model (a local HF directory, a hub id, "
                             f"or a built-in tiny model: {', '.join(TINY_MODELS)})")
    if is_tiny_model(name):
        yield str(ensure_tiny_model(name))
        return
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        yield os.path.abspath(expanded)
        return
    promoted = parse_model_name(name)
    if promoted and store is not None:
        model_dir = store.model_dir(*promoted)
        if store.read_meta(model_dir) is not None:
            with store.local_copy(model_dir) as local:
                yield local
            return
    yield name


def _explain(name: str, what: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {what} {name!r}: it is not a built-in tiny model "
        f"({', '.join(TINY_MODELS)}), not a local directory, not a promoted model in the store, "
        f"and from_pretrained failed ({type(error).__name__}: {error}). Without network access, "
        f"pass a local Hugging Face directory.")


def load_causal_lm(name: str, store: CheckpointStore | None = None,
                   dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a causal LM for training; weights in ``dtype`` (fp32 master weights by default)."""
    with model_source(name, store) as source:
        try:
            with progress_bars_disabled():
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as e:
            raise _explain(name, "base model", e) from e
    return model.to(device)


_SHARED_BASES: weakref.WeakValueDictionary[tuple, PreTrainedModel] = (
    weakref.WeakValueDictionary())
"""Frozen base models that LoRA clients share, by (store, name, dtype, device); each alive
only while a client built on it is."""


def load_shared_base(name: str, store: CheckpointStore | None = None,
                     dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> PreTrainedModel:
    """A model of its own (module tree, buffers' owners, attributes) whose *weights* are those
    of every other model this function returned for the same base: for LoRA, which never
    changes the base, N adapters then hold one copy of the base weights.

    The caller must keep the base weights frozen (``apply_lora`` does); a full-parameter
    trainer loads its own copy with :func:`load_causal_lm`.
    """
    key = (store.root_url if store is not None else None, name, dtype, str(device))
    template = _SHARED_BASES.get(key)
    if template is None:
        template = load_causal_lm(name, store, dtype=dtype, device=device)
        template.requires_grad_(False)
        _SHARED_BASES[key] = template
    tensors = [*template.parameters(), *template.buffers()]
    # deepcopy copies the modules but returns each memoized tensor itself: shared weights.
    model = copy.deepcopy(template, memo={id(t): t for t in tensors})
    # A plain attribute (not a submodule): keeps the template, and so the cache entry, alive.
    object.__setattr__(model, "_homefire_shared_base", template)
    return model


def own_weights(model: torch.nn.Module) -> None:
    """Give a model from :func:`load_shared_base` its own copy of the base weights (before
    anything writes into them, e.g. loading a full train state), keeping tied weights tied."""
    template = getattr(model, "_homefire_shared_base", None)
    if template is None:
        return
    shared = {id(t) for t in [*template.parameters(), *template.buffers()]}
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for registry in (module._parameters, module._buffers):
            for name, tensor in list(registry.items()):
                if tensor is None or id(tensor) not in shared:
                    continue
                if id(tensor) not in copies:
                    clone = tensor.detach().clone()
                    copies[id(tensor)] = (torch.nn.Parameter(clone, tensor.requires_grad)
                                          if isinstance(tensor, torch.nn.Parameter) else clone)
                registry[name] = copies[id(tensor)]
    object.__setattr__(model, "_homefire_shared_base", None)


def load_tokenizer(name: str, store: CheckpointStore | None = None):
    """Load the tokenizer (with its chat template) for ``name``."""
    with model_source(name, store) as source:
        if os.path.isdir(source) and not any(
                os.path.exists(os.path.join(source, f)) for f in TOKENIZER_FILES):
            # from_pretrained would "succeed" here with an empty tokenizer built from the model
            # config, and every row would then render to garbage.
            raise ModelLoadError(
                f"tokenizer {name!r}: the directory {source} has no tokenizer files (none of "
                f"{', '.join(TOKENIZER_FILES)}); save the tokenizer there "
                f"(tokenizer.save_pretrained(...)) or set tokenizer_model to a directory or hub "
                f"id that has one")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise _explain(name, "tokenizer", e) from e
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of the loss; any id works, eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
