"""Configuration pieces every recipe shares: ``InfraConfig`` and the common validation."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import random
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np
import torch

from training.sdk.choices import Choice
from training.sdk.types import MixedPrecision
from training.utils.lr_schedule import LRSchedule

logger = logging.getLogger(__name__)


class NonFinitePolicy(Choice):
    """What a run does after a step whose loss or gradient norm is NaN or infinite (its update
    is never applied either way)."""

    error = "error"
    """Stop, naming the step and the last good checkpoint."""
    skip = "skip"
    """Go on with the next batch, up to ``max_non_finite_steps`` such steps in a row."""


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
    mixed_precision: MixedPrecision = MixedPrecision.auto
    """``auto`` (bf16 autocast where the hardware is native), ``bf16``, ``fp16`` (with dynamic
    loss scaling, for GPUs without bf16) or ``no``; master weights and optimizer state stay
    fp32."""
    num_threads: int | None = None
    """torch intra-op threads (default: torch's choice). Exact resume needs the same count: a
    different count changes float summation order."""
    account: str | None = None
    """Account segment of checkpoint and model names (default ``local``)."""
    async_checkpoint: bool = True
    """Write periodic STATE checkpoints in the background: the state is copied aside while the
    next forward/backward runs and written to disk after; only the next optimizer step waits for
    the copy. A checkpoint's row reaches checkpoints.jsonl once its files
    are committed, so a crash mid-write resumes from the previous one. The final save is always
    waited for."""
    compile: bool = False
    """Run the policy through ``torch.compile`` (dynamic shapes): faster steps (~20-25% on CPU
    here) after a one-off compile of a minute or more per process, so worth it for long runs
    only. Ignored under torchrun."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them: much less
    activation memory (long sequences, big batches) for ~30% more compute; same results."""
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
    chat_template: str | None = None
    """A Jinja chat template to render the data with instead of the tokenizer's, or the path
    of a file holding one; the promoted model ships with it. Default: the tokenizer's own."""
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
    lr_schedule: LRSchedule = LRSchedule.linear
    """'constant', 'linear' or 'cosine' decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.0
    """Where 'linear' and 'cosine' decay end, as a fraction of learning_rate (0.1: decay to a
    tenth); in [0, 1]."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW denominator epsilon."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    non_finite_policy: NonFinitePolicy = NonFinitePolicy.error
    """A step whose loss or gradient norm is NaN/infinite never updates the weights; then
    'error' stops the run naming the step and the last good checkpoint (nothing is saved after
    it), 'skip' goes on to the next batch (counted as skipped_non_finite in metrics.jsonl) and
    stops after max_non_finite_steps such steps in a row."""
    max_non_finite_steps: int = 3
    """With non_finite_policy=skip: consecutive non-finite steps before the run stops."""
    resume_overrides: list[str] = field(default_factory=list)
    """Fields a rerun may change on purpose (e.g. [max_steps,learning_rate] to extend a run or
    lower its learning rate); any other change to a field that shapes the training trajectory
    is refused on resume. run.json keeps the history of allowed changes."""
    dcp_save_interval: int = 0
    """Save a resumable STATE checkpoint every N steps; 0 = off (then an interrupted run
    restarts from scratch)."""
    keep_last_n: int | None = None
    """Keep only the newest N periodic STATE checkpoints, deleting older ones after each save;
    None = keep all. Never deleted: the checkpoint a resume needs, promotable (BOTH/SAMPLER)
    checkpoints and promoted ones."""
    init_from_checkpoint: str | None = None
    """Start from the weights of another job's checkpoint, 'job_id:checkpoint_name'; step
    resets to 0. Cannot be combined with resuming an existing log_path."""
    output_model_id: str | None = None
    """If set, promote the final checkpoint to accounts/<account>/models/<output_model_id>."""
    seed: int = 0
    """Seeds data order and RNGs."""
    lora_rank: int = 0
    """0 trains all weights; > 0 trains a LoRA adapter of this rank on the frozen base."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (scale = alpha / rank); default 2 * lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch during training."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt; default: every attention and MLP projection (q/k/v/o, gate/up/
    down) the model has."""
    merge_lora_on_promote: bool = False
    """Promote a LoRA run as a merged full model (plain transformers loads it) instead of an
    adapter directory (PeftModel.from_pretrained on the base)."""
    tensorboard_dir: str | None = None
    """Also write metrics as TensorBoard events to this directory (needs the optional
    tensorboard package); a resume purges the interrupted run's later events."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project (needs the optional wandb package);
    a resume continues the same W&B run (its id is kept in log_path/wandb_run_id)."""
    infra: InfraConfig = field(default_factory=InfraConfig)


def resolve_chat_template(config: Any) -> str | None:
    """The text of ``config.chat_template``: the template itself, or the file it names.

    Raises:
        ConfigError: a path that does not exist or cannot be read.
    """
    value = getattr(config, "chat_template", None)
    if not value or "{" in value:  # Jinja templates always hold a {{ ... }} or {% ... %}
        return value or None
    path = os.path.expanduser(value)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"chat_template={value!r} is neither a Jinja template nor a readable "
                          f"file ({e.strerror}); pass the template text or the path of a "
                          f".jinja file") from None


def tokenizer_name(config: Any) -> str:
    """The tokenizer a run uses: ``tokenizer_model``, else the base model's."""
    return config.tokenizer_model or config.base_model


def validate_common(config: Any) -> None:
    """Checks shared by all recipes; raise :class:`ConfigError` naming the field."""
    if not getattr(config, "log_path", None) or config.log_path == "???":
        raise ConfigError("log_path is required: the directory for checkpoints.jsonl, "
                          "metrics.jsonl and logs (rerun with the same log_path to resume)")
    check_field_types(config)
    for name, package, extra in (("tensorboard_dir", "tensorboard", "tensorboard"),
                                 ("wandb_project", "wandb", "wandb")):
        # Checked now, not after the model is loaded: these packages are optional.
        if getattr(config, name, None) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{name}={getattr(config, name)!r} needs the {package} package, "
                              f"which is not installed: pip install 'homefire[{extra}]', or "
                              f"unset {name}")
    if getattr(config, "lora_rank", 0) < 0:
        raise ConfigError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {config.lora_rank}")
    if getattr(config, "lora_rank", 0) == 0 and getattr(config, "merge_lora_on_promote", False):
        raise ConfigError("merge_lora_on_promote=true needs lora_rank > 0 (a full fine-tune "
                          "is already a plain model)")
    keep_last_n = getattr(config, "keep_last_n", None)
    if keep_last_n is not None and keep_last_n < 1:
        raise ConfigError(f"keep_last_n must be >= 1 (or null to keep every checkpoint), got "
                          f"{keep_last_n}")
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
    _check_optimizer_fields(config)
    resolve_chat_template(config)
    if getattr(config, "max_non_finite_steps", 1) < 1:
        raise ConfigError(f"max_non_finite_steps must be >= 1, got "
                          f"{config.max_non_finite_steps}")
    init = getattr(config, "init_from_checkpoint", None)
    if init is not None:
        from training.sdk.names import parse_checkpoint_ref, validate_name

        try:  # checked before it is joined into a store path
            job, name = parse_checkpoint_ref(init)
            validate_name(job, "job id")
            validate_name(name)
        except ValueError as e:
            raise ConfigError(f"init_from_checkpoint={init!r}: expected 'job_id:checkpoint_name' "
                              f"(e.g. 'i44pvd4syzg8hjfk:step-4'), 'cross_job://job_id/name' or "
                              f"a tinker:// train state path: {e}") from None
    log_path = getattr(config, "log_path", None)
    if log_path and os.path.exists(log_path) and not os.path.isdir(log_path):
        raise ConfigError(f"log_path={log_path!r} is a file; log_path is a directory (for "
                          f"checkpoints.jsonl, metrics.jsonl and run.json): choose another path")
    infra = getattr(config, "infra", None)
    if infra is not None:
        _check_infra(infra)
    output_model_id = getattr(config, "output_model_id", None)
    if output_model_id is not None:
        from training.sdk.registry import validate_output_model_id

        problems = validate_output_model_id(output_model_id)
        if problems:
            raise ConfigError(f"output_model_id={output_model_id!r} is invalid: "
                              f"{'; '.join(problems)}")


def _check_infra(infra: Any) -> None:
    if infra.num_threads is not None and infra.num_threads < 1:
        raise ConfigError(f"infra.num_threads must be >= 1 (or null for torch's default), got "
                          f"{infra.num_threads}")
    device = str(infra.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"infra.device={device!r} but this machine has no usable CUDA GPU "
                          f"(torch.cuda.is_available() is False); use 'auto' or 'cpu'")
    if device not in ("auto", "cpu") and not device.startswith(("cuda", "mps", "xpu")):
        raise ConfigError(f"infra.device={device!r}: expected 'auto', 'cpu', 'cuda' or "
                          f"'cuda:N'")


NON_FINITE_POLICIES = NonFinitePolicy.values()
"""Values of ``non_finite_policy``."""

TRAJECTORY_FIELDS = (
    "learning_rate", "lr_schedule", "warmup_steps", "min_lr_ratio", "adam_beta1", "adam_beta2",
    "adam_eps", "weight_decay", "grad_clip_norm", "epochs", "max_steps", "lora_alpha", "lora_dropout",
    "lora_target_modules", "non_finite_policy", "max_non_finite_steps",
)
"""Fields of every recipe that change the training trajectory: part of a run's identity, so a
rerun that changes one is refused unless it is named in ``resume_overrides`` (recipes add their
own: loss settings, data, sequence length, ...)."""

_RANGES: dict[str, tuple[str, Any]] = {
    # field: (rule, what the message says)
    "learning_rate": ("positive", "> 0"),
    "adam_beta1": ("unit", "in [0, 1)"),
    "adam_beta2": ("unit", "in [0, 1)"),
    "adam_eps": ("positive", "> 0"),
    "weight_decay": ("non-negative", ">= 0"),
    "grad_clip_norm": ("non-negative", ">= 0 (0 = off)"),
    "warmup_steps": ("non-negative", ">= 0"),
    "min_lr_ratio": ("fraction", "in [0, 1]"),
    "lora_dropout": ("unit", "in [0, 1)"),
    "temperature": ("positive", "> 0"),
    "beta": ("positive", "> 0"),
    "kl_beta": ("non-negative", ">= 0"),
    "dro_beta": ("non-negative", ">= 0"),
}
"""Numeric fields every run refuses outside these ranges, NaN and infinity included (a NaN
learning rate passed 'learning_rate <= 0' once and trained a model to NaN)."""


def _check_optimizer_fields(config: Any) -> None:
    for name, (rule, text) in _RANGES.items():
        value = getattr(config, name, None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ok = math.isfinite(value) and {
            "positive": value > 0, "non-negative": value >= 0,
            "unit": 0 <= value < 1, "fraction": 0 <= value <= 1}[rule]
        if not ok:
            raise ConfigError(f"{name} must be a finite number {text}, got {value}")


_SIMPLE_TYPES = (bool, int, float, str)


def check_field_types(config: Any, prefix: str = "") -> None:
    """Refuse a field whose value is not of its annotated type (``batch_size="8"``).

    The command line gets this from Hydra; this covers configs built in Python. Checks fields
    annotated with ``bool``/``int``/``float``/``str`` or a :class:`Choice` (optionally
    ``| None``) and recurses into nested config dataclasses; other annotations are left to the
    recipe. An int is accepted for a float field; a bool is never accepted for a number. A
    choice field given as its string is set to the member; another string is refused with the
    choices.
    """
    try:
        hints = typing.get_type_hints(type(config))
    except (NameError, TypeError):  # an annotation this Python cannot evaluate: skip the check
        return
    for f in fields(config):
        value = getattr(config, f.name)
        name = f"{prefix}{f.name}"
        if is_dataclass(value) and not isinstance(value, type):
            check_field_types(value, prefix=f"{name}.")
            continue
        hint = hints.get(f.name)
        origin = typing.get_origin(hint)
        if origin in (list, tuple, dict, set):  # a container: its own type, items unchecked
            if not isinstance(value, origin):
                raise ConfigError(f"{name} must be a {origin.__name__}, got "
                                  f"{type(value).__name__} {value!r}")
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        allowed = [a for a in args if a is not type(None)] if args else [hint]
        if value is None and optional:
            continue
        if len(allowed) == 1 and isinstance(allowed[0], type) and issubclass(allowed[0], Choice):
            # A closed set: the member, or its string from a config built in Python.
            try:
                setattr(config, f.name, allowed[0].parse(value, name))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            continue
        if len(allowed) != 1 or allowed[0] not in _SIMPLE_TYPES:
            continue
        expected = allowed[0]
        ok = (isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
              or expected is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(
                f"{name} must be {expected.__name__}{' or None' if optional else ''}, got "
                f"{type(value).__name__} {value!r}; set it to a value of that type, e.g. "
                f"{name}={_example(expected)}")


def _example(expected: type) -> str:
    return {bool: "True", int: "8", float: "0.001", str: "'text'"}[expected]


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
