"""``with ResumableRun(...) as run``: the cursor, the common step metrics, and release of the
log_path lock and SIGTERM handler on every way out of the block."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training.recipes.sft_loop import Config
from training.sdk import Datum
from training.utils import InfraConfig
from training.utils.data import SupervisedDataset
from training.utils.metrics import read_metrics
from training.utils.run import ResumableRun

from .conftest import TEST_MODEL
from .test_sft_recipe import _write_chats

_TRY_LOCK = """
import fcntl, sys
with open(sys.argv[1], "a+") as f:
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(3)
"""


def _locked_by_someone(log_path: Path) -> bool:
    """Whether another process would find the run's lock taken (POSIX locks never block
    their own process, so ask a child)."""
    done = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(log_path / ".lock")])
    return done.returncode == 3


def _config(tmp_path: Path) -> Config:
    return Config(log_path=str(tmp_path / "run"), base_model=TEST_MODEL,
                  dataset=str(_write_chats(tmp_path / "chats.jsonl", n=12)), batch_size=4,
                  epochs=1, learning_rate=1e-3,
                  infra=InfraConfig(storage_root=str(tmp_path / "store"), num_threads=1,
                                    mixed_precision="no"))


def test_an_error_in_the_loop_releases_the_lock_and_the_sigterm_handler(tmp_path,
                                                                       tiny_model_dir):
    config = _config(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ZeroDivisionError):
        with ResumableRun(config, recipe="sft_loop", dataset=SupervisedDataset(list(range(12)), seed=0),
                          identity={}) as run:
            run.start()
            assert _locked_by_someone(Path(config.log_path))
            assert signal.getsignal(signal.SIGTERM) is not before
            for _ in run.batches():
                1 / 0  # noqa: B018 (the step body fails)
    assert not _locked_by_someone(Path(config.log_path))
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_run_owns_the_cursor_and_adds_the_common_metrics(tmp_path, tiny_model_dir):
    config = _config(tmp_path)
    dataset = SupervisedDataset(list(range(12)), seed=0)
    with ResumableRun(config, recipe="sft_loop", dataset=dataset, identity={}) as run:
        client = run.start()
        assert (run.step, run.data_consumed, run.total_steps) == (0, 0, 3)
        seen = []
        for batch in run.batches():
            seen += batch
            assert run.adam_params().learning_rate == run.adam_params(run.step).learning_rate
            client.forward_backward([Datum(model_input=[1, 2, 3],
                                           loss_fn_inputs={"target_tokens": [2, 3, 4]})]).result()
            optim = client.optim_step(run.adam_params()).result()
            run.end_step({"loss": 1.0}, consumed=len(batch), optim=optim, num_tokens=3)
        assert sorted(seen) == list(range(12)) and run.data_consumed == 12 and run.step == 3
        result = run.finish()
    assert result.steps == 3 and result.final_checkpoint["name"] == "step-3"
    rows = read_metrics(config.log_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"loss", "num_tokens", "tokens_per_s", "step_time_s", "learning_rate",
                "grad_norm", "epoch", "data_consumed"} <= row.keys()
    assert rows[-1]["epoch"] == 1.0


def test_a_step_without_end_step_is_refused(tmp_path, tiny_model_dir):
    config = _config(tmp_path)
    with ResumableRun(config, recipe="sft_loop", dataset=SupervisedDataset(list(range(12)), seed=0),
                      identity={}) as run:
        run.start()
        with pytest.raises(RuntimeError, match="without run.end_step"):
            for _ in run.batches():
                pass


def test_min_lr_ratio_sets_where_the_schedule_ends_and_is_range_checked(tmp_path, tiny_model_dir):
    from training.utils import ConfigError

    config = _config(tmp_path)
    config.lr_schedule, config.min_lr_ratio, config.learning_rate = "cosine", 0.1, 1e-3
    dataset = SupervisedDataset(list(range(12)), seed=0)
    with ResumableRun(config, recipe="sft_loop", dataset=dataset, identity={}) as run:
        assert run.adam_params(0).learning_rate == pytest.approx(1e-3)
        assert run.adam_params(run.total_steps).learning_rate == pytest.approx(1e-4)
    config.min_lr_ratio = 1.5
    with pytest.raises(ConfigError, match=r"min_lr_ratio must be a finite number in \[0, 1\]"):
        ResumableRun(config, recipe="sft_loop", dataset=SupervisedDataset([1], seed=0),
                     identity={})
