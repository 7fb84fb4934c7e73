"""The SFT recipe end to end: resume, kill -9, completion, init_from_checkpoint, promotion."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.recipes.sft_loop import Config, main
from training.utils import ConfigError, InfraConfig
from training.utils.data import DatasetError
from training.utils.metrics import read_metrics

from .conftest import TEST_MODEL, checkpoint_rows, final_sampler_weights

REPO = Path(__file__).resolve().parent.parent
SEED_ROW_FIELDS = {"name", "step", "data_consumed", "source_job_id", "base_model"}


def _write_chats(path: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, log_name: str = "run", **overrides) -> Config:
    fields = dict(log_path=str(tmp_path / log_name), base_model=TEST_MODEL,
                  dataset=str(tmp_path / "chats.jsonl"), batch_size=4, epochs=2,
                  learning_rate=1e-3, seed=3,
                  infra=InfraConfig(storage_root=str(tmp_path / "store"), num_threads=1,
                                    mixed_precision="no"))
    fields.update(overrides)
    return Config(**fields)


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    return _write_chats(tmp_path / "chats.jsonl")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_rows_follow_the_seed_schema_and_final_is_both(tmp_path, chats):
    result = main(_config(tmp_path, dcp_save_interval=4))
    rows = checkpoint_rows(result.log_path)
    # 24 examples x 2 epochs / batch 4 = 12 steps: STATE at 4 and 8, BOTH at 12.
    assert [r["step"] for r in rows] == [4, 8, 12]
    for row in rows:
        assert SEED_ROW_FIELDS <= row.keys()
        assert row["data_consumed"] == row["step"] * 4
        assert row["state_path"] == f"cross_job://{row['source_job_id']}/{row['name']}"
        assert row["base_model"] == TEST_MODEL
    assert "sampler_path" not in rows[0] and "sampler_path" not in rows[1]
    assert rows[2]["sampler_path"].startswith("step-12-")
    metrics = read_metrics(result.log_path)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_rerun_after_completion_changes_nothing(tmp_path, chats, capsys):
    config = _config(tmp_path, dcp_save_interval=6)
    main(config)
    log = Path(config.log_path)
    before = {p.name: p.read_bytes() for p in log.iterdir()}
    result = main(config)
    assert result.already_complete
    assert "already complete" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in log.iterdir()} == before


def test_resume_from_a_state_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, chats):
    reference = main(_config(tmp_path, "reference", dcp_save_interval=5))

    # The same run, rolled back to its step-5 checkpoint as if it had crashed after it: the
    # rows after it are gone, the metrics rows of later steps remain.
    interrupted = _config(tmp_path, "interrupted", dcp_save_interval=5)
    main(interrupted)
    log = Path(interrupted.log_path)
    rows = checkpoint_rows(log)
    (log / "checkpoints.jsonl").write_text(json.dumps(rows[0]) + "\n")
    resumed = main(interrupted)

    assert checkpoint_rows(resumed.log_path)[-1]["step"] == 12
    ref_w, got_w = final_sampler_weights(tmp_path, reference.log_path), final_sampler_weights(
        tmp_path, resumed.log_path)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    # Steps 6-12 of the first attempt were replaced, not duplicated.
    steps = [m["step"] for m in read_metrics(log)]
    assert steps == list(range(1, 13))
    ref_loss = [m["loss"] for m in read_metrics(reference.log_path)]
    assert [m["loss"] for m in read_metrics(log)] == ref_loss


def test_kill_9_mid_run_then_rerun_is_bitwise_equal(tmp_path, chats):
    """SIGKILL a real run between checkpoints, rerun it, and compare with an uninterrupted one."""
    _write_chats(chats, n=400)
    overrides = [f"dataset={chats}", f"base_model={TEST_MODEL}", "batch_size=4", "epochs=1",
                 "seed=3", "learning_rate=1e-3", "dcp_save_interval=10",
                 f"infra.storage_root={tmp_path / 'store'}", "infra.num_threads=1",
                 "infra.mixed_precision=no"]
    killed_log = tmp_path / "killed"
    cmd = [sys.executable, "-m", "recipes.sft_loop", f"log_path={killed_log}", *overrides]
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
    assert killed_at < 100  # it really was interrupted

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from step-{killed_at}" in rerun.stdout

    torch.set_num_threads(1)
    reference = main(_config(tmp_path, "reference", dataset=str(chats), epochs=1,
                             dcp_save_interval=10))
    ref_w, got_w = final_sampler_weights(tmp_path, reference.log_path), final_sampler_weights(
        tmp_path, killed_log)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert [m["step"] for m in read_metrics(killed_log)] == list(range(1, 101))


def test_init_from_checkpoint_starts_at_step_zero_with_those_weights(tmp_path, chats):
    source = main(_config(tmp_path, "source", dcp_save_interval=4, max_steps=4))
    row = checkpoint_rows(source.log_path)[0]
    init = f"{row['source_job_id']}:{row['name']}"
    config = _config(tmp_path, "child", init_from_checkpoint=init, max_steps=2)
    result = main(config)
    child_rows = checkpoint_rows(result.log_path)
    assert [r["step"] for r in child_rows] == [2]
    assert child_rows[0]["source_job_id"] != row["source_job_id"]
    # Combining init_from_checkpoint with a resumable log_path is refused, and nothing changes.
    before = (Path(config.log_path) / "checkpoints.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="init_from_checkpoint.*already has resumable"):
        main(_config(tmp_path, "child", init_from_checkpoint=init, max_steps=4))
    assert (Path(config.log_path) / "checkpoints.jsonl").read_bytes() == before


def test_init_from_unknown_checkpoint_is_a_clear_error(tmp_path, chats):
    source = main(_config(tmp_path, "source", max_steps=1))
    job = checkpoint_rows(source.log_path)[0]["source_job_id"]
    with pytest.raises(KeyError, match=f"job '{job}' has no train state 'step-99'"):
        main(_config(tmp_path, "child", init_from_checkpoint=f"{job}:step-99"))
    with pytest.raises(KeyError, match="no trainer job 'nojob'"):
        main(_config(tmp_path, "child2", init_from_checkpoint="nojob:step-1"))
    with pytest.raises(ConfigError, match="job_id:checkpoint_name"):
        main(_config(tmp_path, "child3", init_from_checkpoint="step-1"))


def test_resume_with_changed_dataset_or_model_is_refused(tmp_path, chats):
    main(_config(tmp_path, dcp_save_interval=4, max_steps=4))
    _write_chats(chats, n=30)
    with pytest.raises(ConfigError, match="(?s)dataset_fingerprint.*new log_path"):
        main(_config(tmp_path, dcp_save_interval=4, max_steps=8))
    _write_chats(chats, n=24)
    with pytest.raises(ConfigError, match="base_model +saved 'homefire/tiny-qwen3-test'"):
        main(_config(tmp_path, base_model="homefire/tiny-qwen3", max_steps=8))


def test_output_model_id_promotes_a_loadable_model(tmp_path, chats):
    result = main(_config(tmp_path, max_steps=3, output_model_id="sft-test-model"))
    promoted = result.promoted_model
    assert promoted["name"] == "accounts/local/models/sft-test-model"
    model = AutoModelForCausalLM.from_pretrained(promoted["path"])
    tokenizer = AutoTokenizer.from_pretrained(promoted["path"])
    ids = tokenizer("What is 2 plus 2?", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    final = final_sampler_weights(tmp_path, result.log_path)
    for name, tensor in final.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    # A rerun of the finished run re-promotes idempotently (e.g. after a kill mid-promotion).
    again = main(_config(tmp_path, max_steps=3, output_model_id="sft-test-model"))
    assert again.already_complete and again.promoted_model["path"] == promoted["path"]


def test_bad_data_is_refused_before_any_training(tmp_path):
    bad = tmp_path / "chats.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": oops}\n')
    with pytest.raises(DatasetError, match=r"chats.jsonl:2"):
        main(_config(tmp_path))
    assert not (tmp_path / "store" / "jobs").exists()


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", 0, "batch_size must be > 0"),
    ("dcp_save_interval", -1, "dcp_save_interval must be >= 0"),
    ("output_model_id", "Bad_Name", "output_model_id='Bad_Name' is invalid"),
    ("lr_schedule", "exp", "lr_schedule='exp'"),
    ("grad_accumulation_normalization", "tokens", "grad_accumulation_normalization"),
])
def test_bad_config_values_name_the_field(tmp_path, chats, field, value, match):
    with pytest.raises(ConfigError, match=match):
        main(_config(tmp_path, **{field: value}))


def test_hydra_cli_help_cfg_and_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "recipes.sft_loop", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    cfg = run("--cfg", "job", "log_path=/tmp/x", "batch_size=3", "infra.num_threads=2")
    assert cfg.returncode == 0, cfg.stderr
    assert "batch_size: 3" in cfg.stdout and "num_threads: 2" in cfg.stdout
    assert "dcp_save_interval: 0" in cfg.stdout

    unknown = run("log_path=/tmp/x", "no_such_key=1")
    assert unknown.returncode != 0 and "no_such_key" in unknown.stderr

    wrong_type = run("log_path=/tmp/x", "batch_size=many")
    assert wrong_type.returncode != 0 and "batch_size" in wrong_type.stderr

    helped = run("--help")
    assert helped.returncode == 0 and "dcp_save_interval: 0" in helped.stdout
    assert "log_path: ???" in helped.stdout  # required, shown as Hydra's missing marker


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")


def test_chat_template_override_renders_the_data_and_ships_with_the_model(tmp_path, chats):
    template_file = tmp_path / "plain.jinja"
    template_file.write_text(TEMPLATE)
    result = main(_config(tmp_path, chat_template=str(template_file), max_steps=2,
                          output_model_id="templated"))
    tokenizer = AutoTokenizer.from_pretrained(result.promoted_model["path"])
    assert tokenizer.chat_template == TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user: hi<|im_end|>"
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(run["chat_template_sha256"]) == 16  # a changed template is a changed run
    with pytest.raises(ConfigError, match=r"chat_template='missing.jinja' is neither a Jinja "
                                          r"template nor a readable file"):
        main(_config(tmp_path, log_name="other", chat_template="missing.jinja"))


def test_sft_trains_on_prompt_completion_rows(tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is", "completion": f" {2 * i}."})
                            + "\n" for i in range(12)))
    result = main(_config(tmp_path, dataset=str(data), max_steps=3))
    assert result.steps == 3
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))


def test_grad_accumulation_steps_give_the_same_update_in_parts(tmp_path, chats):
    whole = main(_config(tmp_path, log_name="whole", max_steps=3))
    parts = main(_config(tmp_path, log_name="parts", max_steps=3, grad_accumulation_steps=2))
    a = read_metrics(tmp_path / "whole")
    b = read_metrics(tmp_path / "parts")
    for row_a, row_b in zip(a, b, strict=True):
        assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-5)
        assert row_a["grad_norm"] == pytest.approx(row_b["grad_norm"], rel=1e-4)
    assert whole.steps == parts.steps == 3
    with pytest.raises(ConfigError, match="grad_accumulation_steps must be between 1 and "
                                          "batch_size"):
        main(_config(tmp_path, log_name="bad", grad_accumulation_steps=5))


def test_eval_fraction_holds_rows_out_and_reports_eval_loss(tmp_path, chats):
    main(_config(tmp_path, eval_fraction=0.25, eval_every=2, max_steps=4))
    rows = read_metrics(tmp_path / "run")
    assert [("eval_loss" in r) for r in rows] == [False, True, False, True]
    assert all(math.isfinite(r["eval_loss"]) for r in rows if "eval_loss" in r)
    # 24 chats, 6 held out: an epoch is 18 examples (the held-out ones are never trained on).
    assert rows[-1]["epoch"] == pytest.approx(4 * 4 / 18)
    again = main(_config(tmp_path, log_name="again", eval_fraction=0.25, eval_every=2,
                         max_steps=4))
    assert again.steps == 4
    assert [r.get("eval_loss") for r in read_metrics(tmp_path / "again")] == \
        [r.get("eval_loss") for r in rows]  # the same rows held out, the same losses
    with pytest.raises(ConfigError, match="set eval_dataset or eval_fraction, not both"):
        main(_config(tmp_path, log_name="both", eval_fraction=0.1,
                     eval_dataset=str(chats)))


def test_eval_dataset_reports_its_loss_at_the_end(tmp_path, chats):
    main(_config(tmp_path, eval_dataset=str(chats), max_steps=2))
    rows = read_metrics(tmp_path / "run")
    assert "eval_loss" not in rows[0] and math.isfinite(rows[-1]["eval_loss"])


def test_early_stopping_ends_the_run_and_a_rerun_reports_it_complete(tmp_path, chats):
    # A learning rate this high makes the validation loss climb at once.
    config = dict(eval_fraction=0.25, eval_every=1, early_stopping_patience=2, max_steps=12,
                  learning_rate=0.5, dcp_save_interval=2)
    result = main(_config(tmp_path, **config))
    rows = read_metrics(tmp_path / "run")
    assert 2 < result.steps < 12 and len(rows) == result.steps
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["stopped_early"]["step"] == result.steps
    assert "has not improved" in run["stopped_early"]["reason"]
    final = checkpoint_rows(tmp_path / "run")[-1]
    assert final["step"] == result.steps and final["sampler_path"]
    again = main(_config(tmp_path, **config))
    assert again.already_complete and again.steps == result.steps
