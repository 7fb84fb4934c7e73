"""Configuration pieces every recipe shares: ``InfraConfig`` and the common validation."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field, fields
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


@dataclass(kw_only=True)
class TrainConfig:
    """The fields every recipe's ``Config`` shares (each recipe subclasses it, adds its own
    fields and may change defaults). The defaults run the embedded demo: the built-in tiny model
    on bundled sample data."""

    log_path: str
    """Directory for checkpoints.jsonl, metrics.jsonl and run.json. Required. Rerun with the
    same log_path to resume."""
    base_model: str = "homefire/tiny-qwen3"
    """Model to fine-tune: a built-in tiny model, a local HF directory, a promoted model
    (accounts/<a>/models/<id>) or a Hugging Face hub id."""
    tokenizer_model: str | None = None
    """Tokenizer (with chat template) to render the data; default: base_model's."""
    dataset: str = ""
    """Training data: a JSONL file or any `datasets` source (each recipe documents its format
    and bundled default)."""
    dataset_split: str = "train"
    """Split to use for `datasets` sources."""
    max_seq_len: int = 512
    """Longest row in tokens."""
    batch_size: int = 8
    """Rows per optimizer step."""
    epochs: int = 3
    """Passes over the data (the order is reshuffled each epoch from `seed`)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (caps `epochs`)."""
    learning_rate: float = 1e-3
    """Peak learning rate. 1e-3 suits the tiny demo model; use ~1e-5 for billion-parameter
    full fine-tuning."""
    lr_schedule: str = "linear"
    """'constant', 'linear' or 'cosine' decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    dcp_save_interval: int = 0
    """Save a resumable STATE checkpoint every N steps; 0 = off (then an interrupted run
    restarts from scratch)."""
    init_from_checkpoint: str | None = None
    """Start from the weights of another job's checkpoint, 'job_id:checkpoint_name'; step
    resets to 0. Cannot be combined with resuming an existing log_path."""
    output_model_id: str | None = None
    """If set, promote the final checkpoint to accounts/<account>/models/<output_model_id>."""
    seed: int = 0
    """Seeds data order and RNGs."""
    infra: InfraConfig = field(default_factory=InfraConfig)


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
    schedule = getattr(config, "lr_schedule", None)
    if schedule is not None:
        from training.utils.lr_schedule import LR_SCHEDULES

        if schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule={schedule!r}: expected one of "
                              f"{', '.join(LR_SCHEDULES)}")
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
