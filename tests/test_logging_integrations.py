"""Optional metric destinations: TensorBoard and Weights & Biases (offline), across a resume.

Each test runs only where its optional package is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from training.recipes.sft_loop import Config, main
from training.utils import ConfigError, InfraConfig
from training.utils.metrics import WANDB_RUN_ID_FILE

from .conftest import TEST_MODEL


def _config(tmp_path: Path, **overrides) -> Config:
    fields = dict(log_path=str(tmp_path / "run"), base_model=TEST_MODEL,
                  dataset=str(tmp_path / "chats.jsonl"), batch_size=4, max_steps=6,
                  dcp_save_interval=2, seed=3,
                  infra=InfraConfig(storage_root=str(tmp_path / "store"), num_threads=1,
                                    mixed_precision="no"))
    fields.update(overrides)
    return Config(**fields)


@pytest.fixture(autouse=True)
def _setup(tmp_path: Path):
    threads = torch.get_num_threads()
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n"
        for i in range(24)))
    yield
    torch.set_num_threads(threads)


def _roll_back_to_step_2(log: Path) -> None:
    """As if the run had been killed right after its step-2 checkpoint."""
    first = (log / "checkpoints.jsonl").read_text().splitlines()[0]
    (log / "checkpoints.jsonl").write_text(first + "\n")


def test_tensorboard_scalars_have_no_duplicate_steps_after_resume(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is the optional 'tensorboard' extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = tmp_path / "tb"
    config = _config(tmp_path, tensorboard_dir=str(tb_dir))
    main(config)
    _roll_back_to_step_2(tmp_path / "run")
    main(config)
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    assert {"learning_rate", "tokens_per_s", "grad_norm"} <= set(events.Tags()["scalars"])


def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is the optional 'wandb' extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(tmp_path, wandb_project="homefire-test")
    main(config)
    log = tmp_path / "run"
    run_id = (log / WANDB_RUN_ID_FILE).read_text()
    _roll_back_to_step_2(log)
    main(config)
    assert (log / WANDB_RUN_ID_FILE).read_text() == run_id
    # Both sessions logged to the same run id (offline runs are directories named by it).
    run_dirs = sorted(p.name for p in (log / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and all(name.endswith(f"-{run_id}") for name in run_dirs)


def test_missing_optional_package_is_refused_before_training(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"wandb_project='p' needs the wandb package, which is "
                                          r"not installed: pip install 'homefire\[wandb\]'"):
        main(_config(tmp_path, wandb_project="p"))
    assert not (tmp_path / "run").exists()
