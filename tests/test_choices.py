"""Closed sets as ``Choice`` enums: parsed from the command line by name, from Python as plain
strings, printed and stored as their values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import training.recipes.dpo_loop
import training.recipes.embedding_loop
import training.recipes.rl_loop
import training.recipes.sft_loop  # noqa: F401 (every recipe's choices are defined)
import training.utils.preference_data  # noqa: F401
from training.recipes.sft_loop import Config
from training.sdk import GradAccNormalization, MixedPrecision
from training.sdk.choices import Choice
from training.utils import ConfigError, InfraConfig
from training.utils.config import validate_common
from training.utils.lr_schedule import LRSchedule

REPO = Path(__file__).resolve().parent.parent


def _all_choices(cls: type = Choice) -> list[type[Choice]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_choices(sub)]
    return found


def test_every_member_is_named_as_its_value_so_the_command_line_parses_it():
    choices = _all_choices()
    assert {c.__name__ for c in choices} >= {"LRSchedule", "LongRowPolicy", "NonFinitePolicy",
                                             "GradAccNormalization", "MixedPrecision", "Pooling",
                                             "DPOLossType", "RLLoss", "Engine", "SnapshotType",
                                             "DeploymentCleanup", "PreferenceFormat",
                                             "CustomOutput"}
    for cls in choices:
        for member in cls:  # canonical members (aliases such as NUM_LOSS_TOKENS excluded)
            assert member.name == member.value, f"{cls.__name__}.{member.name}"
            assert str(member) == f"{member}" == member.value
            assert json.dumps(member) == json.dumps(member.value)


def test_python_configs_take_plain_strings_and_get_members(tmp_path):
    config = Config(log_path=str(tmp_path / "run"), lr_schedule="cosine",
                    long_row_policy="truncate", grad_accumulation_normalization="none",
                    infra=InfraConfig(mixed_precision="fp32"))
    validate_common(config)
    assert config.lr_schedule is LRSchedule.cosine
    assert config.grad_accumulation_normalization is GradAccNormalization.none
    assert config.infra.mixed_precision is MixedPrecision.no  # fp32 is a spelling of no
    assert GradAccNormalization.NUM_LOSS_TOKENS is GradAccNormalization.num_loss_tokens
    assert config.lr_schedule == "cosine"  # compares as its value (run.json, older runs)


@pytest.mark.parametrize("field, value, message", [
    ("lr_schedule", "cosnie", "lr_schedule='cosnie': expected one of constant, linear, cosine"),
    ("long_row_policy", "cut", "long_row_policy='cut': expected one of drop, truncate, error"),
    ("non_finite_policy", "ignore", "non_finite_policy='ignore': expected one of error, skip"),
])
def test_python_configs_refuse_other_strings_naming_field_and_choices(tmp_path, field, value,
                                                                      message):
    with pytest.raises(ConfigError) as refused:
        validate_common(Config(log_path=str(tmp_path / "run"), **{field: value}))
    assert str(refused.value) == message
    with pytest.raises(ConfigError, match=r"infra.mixed_precision='fp8': expected one of auto"):
        validate_common(Config(log_path=str(tmp_path / "run"),
                               infra=InfraConfig(mixed_precision="fp8")))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipes.sft_loop", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_the_command_line_parses_choices_by_name_and_refuses_others(tmp_path):
    shown = _cli(f"log_path={tmp_path}/run", "long_row_policy=truncate", "lr_schedule=cosine",
                 "infra.mixed_precision=no", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    assert "long_row_policy: truncate" in shown.stdout
    assert "lr_schedule: cosine" in shown.stdout
    refused = _cli(f"log_path={tmp_path}/run", "lr_schedule=cosnie")
    assert refused.returncode != 0
    assert "lr_schedule" in refused.stderr and "constant, linear, cosine" in refused.stderr


def test_the_command_line_refuses_keys_the_config_lacks_in_every_form(tmp_path):
    """``key=value`` of an unknown key is Hydra's error; ``+key=value`` (which Hydra would
    append and the recipe ignore) is refused too, nested keys included."""
    for override in ("eval_dataset=x.jsonl", "+eval_dataset=x.jsonl", "+infra.nope=1"):
        refused = _cli(f"log_path={tmp_path}/run", override)
        assert refused.returncode != 0, override
        key = override.lstrip("+").split("=")[0]
        assert key.split(".")[-1] in refused.stderr, (override, refused.stderr)
    assert not (tmp_path / "run").exists()
