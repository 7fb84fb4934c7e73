"""Configuration pieces every recipe shares: ``InfraConfig`` and the common validation."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field and what to do."""


@dataclass(kw_only=True)
class InfraConfig:
    """Where and how the trainer runs (the local stand-in for the hosted training shape)."""

    storage_root: str | None = None
    """fsspec URL or path of the checkpoint store (jobs, train states, sampler snapshots,
    promoted models). Default: ``$HOMEFIRE_STORAGE_ROOT`` or ``~/.cache/homefire/store``."""
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:N``."""
    mixed_precision: str = "auto"
    """``auto`` (bf16 autocast where the hardware is native), ``bf16`` or ``no``; master weights
    and optimizer state stay fp32."""
    num_threads: int | None = None
    """torch intra-op threads (default: torch's choice). Exact resume needs the same count: a
    different count changes float summation order."""
    account: str | None = None
    """Account segment of checkpoint and model names (default ``local``)."""
    training_shape_id: str | None = None
    """Accepted so hosted configs port unchanged; ignored by the local trainer."""


def validate_common(config: Any) -> None:
    """Checks shared by all recipes; raise :class:`ConfigError` naming the field."""
    if not getattr(config, "log_path", None) or config.log_path == "???":
        raise ConfigError("log_path is required: the directory for checkpoints.jsonl, "
                          "metrics.jsonl and logs (rerun with the same log_path to resume)")
    positive = ("batch_size", "max_seq_len", "epochs")
    for name in positive:
        value = getattr(config, name, None)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    for name in ("max_steps",):
        value = getattr(config, name, None)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be > 0 (or null for no cap), got {value}")
    if getattr(config, "dcp_save_interval", 0) < 0:
        raise ConfigError(f"dcp_save_interval must be >= 0 (0 = off), got "
                          f"{config.dcp_save_interval}")
    if getattr(config, "learning_rate", 1.0) <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {config.learning_rate}")
    init = getattr(config, "init_from_checkpoint", None)
    if init is not None and (":" not in init or init.startswith(":") or init.endswith(":")):
        raise ConfigError(f"init_from_checkpoint={init!r}: expected 'job_id:checkpoint_name' "
                          f"(e.g. 'i44pvd4syzg8hjfk:step-4')")
    output_model_id = getattr(config, "output_model_id", None)
    if output_model_id is not None:
        from training.sdk.registry import validate_output_model_id

        problems = validate_output_model_id(output_model_id)
        if problems:
            raise ConfigError(f"output_model_id={output_model_id!r} is invalid: "
                              f"{'; '.join(problems)}")


def apply_infra(infra: InfraConfig, seed: int) -> None:
    """Process-wide settings a run depends on: thread count and the seeded RNGs."""
    if infra.num_threads is not None:
        torch.set_num_threads(infra.num_threads)
    # Seed every RNG a recipe may touch; resume overwrites them with the saved states.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a (nested) config dataclass."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        out[f.name] = config_to_dict(value) if hasattr(value, "__dataclass_fields__") else value
    return out
