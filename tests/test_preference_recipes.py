"""The DPO and ORPO recipes end to end: exact resume (kill -9 too), the reference cache,
init_from_checkpoint as reference, completion, data and config errors, rising accuracy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.recipes import dpo_loop, orpo_loop
from training.sdk import ServiceClient
from training.sdk.models import load_tokenizer
from training.sdk.store import CheckpointStore
from training.utils import ConfigError, InfraConfig
from training.utils.data import DatasetError
from training.utils.metrics import read_metrics
from training.utils.preference_data import (
    SAMPLE_PREFERENCES_PATH,
    build_preference_examples,
    load_preference_pairs,
)
from training.utils.reference_cache import REFERENCE_CACHE_NAMESPACE, compute_reference_logprobs

from .conftest import TEST_MODEL, checkpoint_rows, final_sampler_weights

REPO = Path(__file__).resolve().parent.parent


def _write_prefs(path: Path, n: int = 12) -> Path:
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{i} + {i} = {2 * i}.",
             "rejected": "I don't know."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, log_name: str = "run", recipe=dpo_loop, **overrides):
    fields = dict(log_path=str(tmp_path / log_name), base_model=TEST_MODEL,
                  dataset=str(SAMPLE_PREFERENCES_PATH), batch_size=8, learning_rate=3e-4,
                  seed=3, infra=InfraConfig(storage_root=str(tmp_path / "store"), num_threads=1,
                                            mixed_precision="no"))
    fields.update(overrides)
    return recipe.Config(**fields)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_clients(monkeypatch) -> list:
    """Records every frozen reference client the DPO recipe creates (one per cache miss)."""
    made = []
    original = dpo_loop.create_starting_point_client

    def spy(config):
        made.append(original(config))
        return made[-1]

    monkeypatch.setattr(dpo_loop, "create_starting_point_client", spy)
    return made


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "store" / "cache" / REFERENCE_CACHE_NAMESPACE).glob("ref-*.pt"))


def test_resume_is_bitwise_equal_and_reuses_the_reference_cache(tmp_path, reference_clients):
    reference = dpo_loop.main(_config(tmp_path, "reference", max_steps=24, dcp_save_interval=8))
    assert len(reference_clients) == 1  # computed once ...
    (cache,) = _cache_files(tmp_path)

    interrupted = _config(tmp_path, "interrupted", max_steps=24, dcp_save_interval=8)
    dpo_loop.main(interrupted)
    # ... and reused by another run on the same data and model, and by the resume below.
    log = Path(interrupted.log_path)
    (log / "checkpoints.jsonl").write_text(json.dumps(checkpoint_rows(log)[0]) + "\n")  # crash after 8
    cache_mtime = cache.stat().st_mtime_ns
    resumed = dpo_loop.main(interrupted)
    assert len(reference_clients) == 1 and cache.stat().st_mtime_ns == cache_mtime

    assert [r["step"] for r in checkpoint_rows(resumed.log_path)] == [8, 16, 24]
    ref_w, got_w = final_sampler_weights(tmp_path, reference.log_path), final_sampler_weights(tmp_path, log)
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    # Rewards after the resume point are measured against the same reference, not the resumed
    # weights (which would make them ~0).
    ref_metrics, got_metrics = read_metrics(reference.log_path), read_metrics(log)
    assert [m["step"] for m in got_metrics] == list(range(1, 25))
    for key in ("loss", "reward_margin", "chosen_reward"):
        assert [m[key] for m in got_metrics] == [m[key] for m in ref_metrics]
    assert abs(got_metrics[8]["chosen_reward"]) > 1e-3

    # The cached values are those of a fresh frozen copy of the base model.
    tokenizer = load_tokenizer(TEST_MODEL, CheckpointStore(str(tmp_path / "store")))
    examples, _ = build_preference_examples(
        load_preference_pairs(str(SAMPLE_PREFERENCES_PATH)), tokenizer, 512)
    base = ServiceClient(str(tmp_path / "store"), device="cpu", mixed_precision="no")
    fresh_chosen, fresh_rejected = compute_reference_logprobs(
        base.create_reference_client(TEST_MODEL), examples, batch_size=8)
    cached = torch.load(cache, weights_only=True)
    assert torch.equal(cached["chosen"], fresh_chosen)
    assert torch.equal(cached["rejected"], fresh_rejected)


def test_preference_accuracy_rises_on_the_bundled_set(tmp_path):
    # Two epochs of 50 steps. Accuracy is measured on each batch before its update, so in
    # epoch 1 it is accuracy on pairs the policy has not trained on yet.
    result = dpo_loop.main(_config(tmp_path, epochs=2, learning_rate=1e-3))
    metrics = read_metrics(result.log_path)
    assert len(metrics) == 100
    # Step 1 trains the reference weights themselves: every reward is exactly 0, a tie.
    assert metrics[0]["chosen_reward"] == metrics[0]["rejected_reward"] == 0.0
    assert metrics[0]["loss"] == pytest.approx(0.693147, abs=1e-6)  # log 2
    early = sum(m["preference_accuracy"] for m in metrics[1:11]) / 10
    late = sum(m["preference_accuracy"] for m in metrics[90:100]) / 10
    assert late >= 0.85 and late > early + 0.1, (early, late)
    assert (sum(m["reward_margin"] for m in metrics[90:100])
            > 3 * sum(m["reward_margin"] for m in metrics[1:11]) > 0)


def test_kill_9_mid_run_then_rerun_is_bitwise_equal(tmp_path):
    """SIGKILL a real DPO run between checkpoints, rerun it, and compare with an uninterrupted
    one (the rerun loads the reference log-probs the killed run cached)."""
    overrides = [f"base_model={TEST_MODEL}", "batch_size=8", "epochs=1", "seed=3",
                 "learning_rate=3e-4", "dcp_save_interval=10",
                 f"infra.storage_root={tmp_path / 'store'}", "infra.num_threads=1",
                 "infra.mixed_precision=no"]
    killed_log = tmp_path / "killed"
    cmd = [sys.executable, "-m", "recipes.dpo_loop", f"log_path={killed_log}", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    checkpoints = killed_log / "checkpoints.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoints.exists() and len(checkpoints.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_rows(killed_log)[-1]["step"]
    assert killed_at < 50  # 400 pairs / 8: it really was interrupted

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from step-{killed_at}" in rerun.stdout
    assert "reference log-probs of 400 pairs: loaded from" in rerun.stdout

    torch.set_num_threads(1)
    reference = dpo_loop.main(_config(tmp_path, "reference", epochs=1, dcp_save_interval=10))
    ref_w, got_w = final_sampler_weights(tmp_path, reference.log_path), final_sampler_weights(
        tmp_path, killed_log)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert [m["step"] for m in read_metrics(killed_log)] == list(range(1, 51))


def test_rerun_after_completion_changes_nothing(tmp_path, reference_clients, capsys):
    config = _config(tmp_path, dataset=str(_write_prefs(tmp_path / "p.jsonl")), epochs=1)
    dpo_loop.main(config)
    log = Path(config.log_path)
    before = {p.name: p.read_bytes() for p in log.iterdir()}
    (cache,) = _cache_files(tmp_path)
    cache_mtime = cache.stat().st_mtime_ns
    result = dpo_loop.main(config)
    assert result.already_complete and "already complete" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in log.iterdir()} == before
    assert len(reference_clients) == 1 and cache.stat().st_mtime_ns == cache_mtime


def test_init_from_checkpoint_is_the_reference(tmp_path, reference_clients):
    dataset = str(_write_prefs(tmp_path / "p.jsonl", n=16))
    source = dpo_loop.main(_config(tmp_path, "source", dataset=dataset, max_steps=4,
                                   dcp_save_interval=4, learning_rate=1e-3))
    row = checkpoint_rows(source.log_path)[0]
    child = dpo_loop.main(_config(tmp_path, "child", dataset=dataset, max_steps=2,
                                  init_from_checkpoint=f"{row['source_job_id']}:{row['name']}"))
    # A second cache entry (the starting weights differ), computed from the checkpoint: the
    # policy's first step sees no difference from its reference. Against the base model the
    # source's 4 steps would show as a reward.
    assert len(reference_clients) == 2 and len(_cache_files(tmp_path)) == 2
    first = read_metrics(child.log_path)[0]
    assert abs(first["chosen_reward"]) < 1e-4 and abs(first["reward_margin"]) < 1e-4
    assert abs(read_metrics(source.log_path)[3]["reward_margin"]) > 1e-2


def test_orpo_runs_without_a_reference_model(tmp_path, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("ORPO must not create a reference model")

    monkeypatch.setattr(ServiceClient, "create_reference_client", no_reference)
    config = _config(tmp_path, recipe=orpo_loop, max_steps=12, dcp_save_interval=6,
                     learning_rate=1e-3)
    result = orpo_loop.main(config)
    assert [r["step"] for r in checkpoint_rows(result.log_path)] == [6, 12]
    assert "sampler_path" in checkpoint_rows(result.log_path)[-1]
    metrics = read_metrics(result.log_path)
    assert {"loss", "nll_loss", "odds_ratio_loss", "log_odds_ratio", "preference_accuracy",
            "reward_margin", "chosen_reward", "rejected_reward"} <= metrics[0].keys()
    assert metrics[-1]["nll_loss"] < metrics[0]["nll_loss"] - 0.3
    assert metrics[-1]["loss"] == pytest.approx(
        metrics[-1]["nll_loss"] + 0.5 * metrics[-1]["odds_ratio_loss"], rel=1e-5)
    assert not _cache_files(tmp_path)


@pytest.mark.parametrize("recipe", [dpo_loop, orpo_loop], ids=["dpo", "orpo"])
def test_bad_preference_rows_fail_before_any_training(tmp_path, recipe):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n'
                   '{"input": {"messages": [{"role": "user", "content": "hi"}]}, '
                   '"preferred_output": [{"role": "assistant"}], "non_preferred_output": []}\n')
    with pytest.raises(DatasetError, match=r"p\.jsonl:2: preferred_output\[0\]\.content is "
                                           r"missing"):
        recipe.main(_config(tmp_path, recipe=recipe, dataset=str(bad)))
    assert not (tmp_path / "store" / "jobs").exists()


@pytest.mark.parametrize("recipe,field,value,match", [
    (dpo_loop, "beta", 0.0, "beta must be a finite number > 0"),
    (dpo_loop, "loss_type", "kto", "loss_type='kto'"),
    (dpo_loop, "long_row_policy", "cut", "long_row_policy='cut'"),
    (orpo_loop, "orpo_lambda", -1.0, "orpo_lambda must be > 0"),
    (orpo_loop, "batch_size", 0, "batch_size must be > 0"),
])
def test_bad_config_values_name_the_field(tmp_path, recipe, field, value, match):
    with pytest.raises(ConfigError, match=match):
        recipe.main(_config(tmp_path, recipe=recipe, **{field: value}))


def test_dpo_reports_eval_metrics_on_held_out_pairs_and_an_eval_dataset(tmp_path,
                                                                       reference_clients):
    from training.utils.metrics import read_metrics

    result = dpo_loop.main(_config(tmp_path, eval_fraction=0.1, eval_every=2, max_steps=4))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert {"eval_loss", "eval_preference_accuracy", "eval_reward_margin"} <= set(rows[1])
    assert rows[0]["num_pairs"] == 8 and result.steps == 4
    # At the start the policy is its reference: DPO's loss is log 2 whatever the pair.
    first = dpo_loop.main(_config(tmp_path, log_name="at-start", eval_fraction=0.1,
                                  learning_rate=1e-9, max_steps=1))
    assert first.steps == 1
    assert read_metrics(tmp_path / "at-start")[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    # A separate eval set gets its own cached reference log-probs (one more frozen client).
    made = len(reference_clients)
    dpo_loop.main(_config(tmp_path, log_name="eval-set", max_steps=2,
                          eval_dataset=str(_write_prefs(tmp_path / "eval.jsonl"))))
    assert len(reference_clients) == made + 1  # the training pairs' cache was reused
    assert "eval_loss" in read_metrics(tmp_path / "eval-set")[-1]


def test_orpo_stops_early_on_its_eval_loss(tmp_path):
    from training.utils.metrics import read_metrics

    config = dict(recipe=orpo_loop, eval_fraction=0.1, eval_every=1, early_stopping_patience=2,
                  max_steps=12, learning_rate=0.5)
    result = orpo_loop.main(_config(tmp_path, **config))
    assert 2 < result.steps < 12
    assert all("eval_loss" in r for r in read_metrics(tmp_path / "run"))
    assert orpo_loop.main(_config(tmp_path, **config)).already_complete
