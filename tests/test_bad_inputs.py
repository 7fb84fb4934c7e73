"""The bad-input catalogue (issue #8): each bad input gets a clear error that names the file,
line, field or checkpoint and says what to do, and nothing already saved is lost.

Most tests point a bad config at one finished-but-extendable run (``saved``: STATE at step 2,
BOTH at step 4, extendable to 8 steps) and assert that every byte of its log_path and store is
unchanged afterwards. The README's troubleshooting section is built from this file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.recipes.sft_loop import Config, main
from training.sdk import (
    CheckpointNotFoundError,
    CheckpointStore,
    JobNotFoundError,
    ModelRegistry,
    NotPromotableError,
)
from training.sdk.models import ModelLoadError
from training.sdk.registry import BaseModelMismatchError
from training.sdk.store import EntryMeta
from training.utils import ConfigError, InfraConfig
from training.utils.checkpoints import CheckpointLoadError
from training.utils.data import DatasetError
from training.utils.run import RunInUseError

from .conftest import TEST_MODEL

REPO = Path(__file__).resolve().parent.parent
USER = {"role": "user", "content": "What is 2 plus 2?"}
ASSISTANT = {"role": "assistant", "content": "2 plus 2 is 4."}


def _write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _chats(n: int = 24) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
            for i in range(n)]


def _config(base: Path, **overrides) -> Config:
    # The saved run stopped at step 4 of these 8 (it ran with max_steps=4): resuming extends it.
    fields = dict(log_path=str(base / "run"), base_model=TEST_MODEL,
                  dataset=str(base / "chats.jsonl"), batch_size=4, epochs=2, max_steps=8,
                  dcp_save_interval=2, learning_rate=1e-3, seed=3,
                  resume_overrides=["max_steps"],
                  infra=InfraConfig(storage_root=str(base / "store"), num_threads=1,
                                    mixed_precision="no"))
    fields.update(overrides)
    return Config(**fields)


def _files(base: Path) -> dict[str, bytes]:
    """Every file of the saved run's log_path and store, by path."""
    return {str(p.relative_to(base)): p.read_bytes()
            for root in (base / "run", base / "store") for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped at step 4 of 8 (a lower max_steps made 4 its end): rows step-2 (STATE)
    and step-4 (BOTH). Tests must leave it exactly as it is."""
    threads = torch.get_num_threads()
    base = tmp_path_factory.mktemp("saved")
    _write_rows(base / "chats.jsonl", _chats())
    main(_config(base, max_steps=4))
    torch.set_num_threads(threads)
    return base


@pytest.fixture
def intact(saved: Path):
    """Asserts after the test that no file of the saved run changed or went missing."""
    before = _files(saved)
    assert len(before) > 10  # log files, job record, two states, a sampler snapshot
    yield saved
    after = _files(saved)
    assert after.keys() == before.keys()
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"bad input changed saved files: {changed}"


def _job(base: Path) -> str:
    rows = [json.loads(line) for line in (base / "run" / "checkpoints.jsonl").open()]
    return rows[0]["source_job_id"]


# ------------------------------------------------------------------------------ data


def test_malformed_json_line(intact: Path, tmp_path: Path):
    data = _write_rows(tmp_path / "bad.jsonl", [{"messages": [USER, ASSISTANT]},
                                                '{"messages": [oops]}'])
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: invalid JSON \(Expecting value, "
                                           r"column 15\); each line must be one complete JSON"):
        main(_config(intact, dataset=str(data)))


def test_wrong_role(intact: Path, tmp_path: Path):
    data = _write_rows(tmp_path / "bad.jsonl",
                       [{"messages": [USER, {"role": "bot", "content": "4"}]}])
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: messages\[1\]\.role is 'bot'; "
                                           r"expected one of system, user, assistant, tool"):
        main(_config(intact, dataset=str(data)))


def test_missing_role(intact: Path, tmp_path: Path):
    data = _write_rows(tmp_path / "bad.jsonl",
                       [{"messages": [USER, ASSISTANT]}, {"messages": [{"content": "hi"}]}])
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: messages\[0\]\.role is missing; "
                                           r"expected one of"):
        main(_config(intact, dataset=str(data)))


def test_empty_dataset(intact: Path, tmp_path: Path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    with pytest.raises(DatasetError, match=r"empty.jsonl: has no rows; expected one JSON object "
                                           r"with a 'messages' list per row"):
        main(_config(intact, dataset=str(data)))


def test_missing_dataset_file(intact: Path, tmp_path: Path):
    with pytest.raises(DatasetError, match=r"nope.jsonl: file not found \(looked at .*\); check "
                                           r"the path"):
        main(_config(intact, dataset=str(tmp_path / "nope.jsonl")))


def test_rows_longer_than_max_seq_len(intact: Path, tmp_path: Path):
    data = _write_rows(tmp_path / "long.jsonl", [{"messages": [USER, ASSISTANT]}])
    with pytest.raises(DatasetError, match=r"long.jsonl:1: renders to \d+ tokens, more than "
                                           r"max_seq_len=8; raise max_seq_len, or set "
                                           r"long_row_policy to 'truncate'"):
        main(_config(intact, dataset=str(data), max_seq_len=8, long_row_policy="error"))
    # The default policy drops them; when nothing is left the error says why and what to do.
    with pytest.raises(DatasetError, match=r"no usable rows: 1 rows: 0 kept .* 1 dropped as too "
                                           r"long.*need a larger max_seq_len \(now 8\)"):
        main(_config(intact, dataset=str(data), max_seq_len=8))


def test_no_trainable_tokens(intact: Path, tmp_path: Path):
    data = _write_rows(tmp_path / "untrained.jsonl", [
        {"messages": [USER, {**ASSISTANT, "weight": 0}]},
        {"messages": [{"role": "system", "content": "Be brief."}, USER]}])
    with pytest.raises(DatasetError, match=r"untrained.jsonl: no usable rows: .*2 dropped with "
                                           r"nothing to train on.*no assistant message, or only "
                                           r"messages with weight 0"):
        main(_config(intact, dataset=str(data)))


# ------------------------------------------------------------------------------ config


def test_unknown_config_key(intact: Path):
    # Python: the dataclass names the keyword. (The command line's Hydra error is tested in
    # test_sft_recipe.py::test_hydra_cli_help_cfg_and_errors.)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bach_size'"):
        _config(intact, bach_size=8)


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", "8", r"batch_size must be int, got str '8'; .* e\.g\. batch_size=8"),
    ("learning_rate", "1e-3", r"learning_rate must be float, got str '1e-3'"),
    ("max_steps", 2.5, r"max_steps must be int or None, got float 2\.5"),
    ("dcp_save_interval", True, r"dcp_save_interval must be int, got bool True"),
    ("infra", InfraConfig(num_threads="2"), r"infra\.num_threads must be int or None, got str"),
])
def test_wrong_type_in_an_override(intact: Path, field, value, match):
    with pytest.raises(ConfigError, match=match):
        main(_config(intact, **{field: value}))


def test_bad_output_model_id(intact: Path):
    with pytest.raises(ConfigError, match=r"output_model_id='My_Model' is invalid: .*contains "
                                          r"'M', '_'.*\(use lowercase\)"):
        main(_config(intact, output_model_id="My_Model"))


# ------------------------------------------------------------------------------ checkpoints


def test_unknown_checkpoint_name(intact: Path, tmp_path: Path):
    job = _job(intact)
    with pytest.raises(CheckpointNotFoundError,
                       match=rf"job '{job}' has no train state 'step-99'; its states: step-2, "
                             rf"step-4"):
        main(_config(intact, log_path=str(tmp_path / "child"),
                     init_from_checkpoint=f"{job}:step-99"))
    assert not (tmp_path / "child").exists()  # refused before anything was written


def test_job_name_with_unknown_job(intact: Path, tmp_path: Path):
    job = _job(intact)
    with pytest.raises(JobNotFoundError,
                       match=rf"no trainer job 'nosuchjob' in the store .* \(known jobs: {job}\); "
                             rf"check the job id or InfraConfig.storage_root"):
        main(_config(intact, log_path=str(tmp_path / "child"),
                     init_from_checkpoint="nosuchjob:step-2"))
    assert not (tmp_path / "child").exists()


def test_init_from_checkpoint_together_with_an_existing_run(intact: Path):
    job = _job(intact)
    with pytest.raises(ConfigError, match=rf"init_from_checkpoint='{job}:step-2' but .*"
                                          rf"checkpoints.jsonl already has resumable checkpoints "
                                          rf"\(last: step-4\).*use a new log_path"):
        main(_config(intact, init_from_checkpoint=f"{job}:step-2"))


def test_mismatched_base_model_on_resume(intact: Path):
    with pytest.raises(ConfigError, match=r"(?s)run.json: this log_path holds a run with "
                                          r"different settings:\n  base_model +saved "
                                          r"'homefire/tiny-qwen3-test' +new "
                                          r"'homefire/tiny-qwen3'.*use a new log_path"):
        main(_config(intact, base_model="homefire/tiny-qwen3"))


def test_mismatched_base_model_on_init_from_checkpoint(intact: Path, tmp_path: Path):
    job = _job(intact)
    with pytest.raises(ConfigError, match=rf"init_from_checkpoint='{job}:step-2' was trained from "
                                          rf"base_model 'homefire/tiny-qwen3-test', but base_model"
                                          rf" is 'homefire/tiny-qwen3'"):
        main(_config(intact, log_path=str(tmp_path / "child"), base_model="homefire/tiny-qwen3",
                     init_from_checkpoint=f"{job}:step-2"))
    assert not (tmp_path / "child").exists()


def test_mismatched_base_model_on_promotion(intact: Path, tmp_path: Path):
    registry = ModelRegistry(str(intact / "store"))
    final = json.loads((intact / "run" / "checkpoints.jsonl").read_text().splitlines()[-1])
    name = registry.checkpoint_name(final["source_job_id"], final["sampler_path"])
    with pytest.raises(BaseModelMismatchError,
                       match=rf"base_model 'homefire/tiny-qwen3' does not match checkpoint "
                             rf"{name}.*pass base_model='homefire/tiny-qwen3-test' or omit it"):
        registry.promote_checkpoint(name=name, output_model_id="m",
                                    base_model="homefire/tiny-qwen3")


def _promote_script():
    spec = importlib.util.spec_from_file_location("promote_checkpoint_catalogue",
                                                  REPO / "scripts" / "promote_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_promoting_a_state_only_checkpoint(intact: Path, capsys):
    jsonl = intact / "run" / "checkpoints.jsonl"
    status = _promote_script().main(["--checkpoints-jsonl", str(jsonl), "--step", "2",
                                     "--output-model-id", "m"])
    assert status == 2
    err = capsys.readouterr().err
    assert f"step 2 ({jsonl}:1) is a STATE-only checkpoint" in err
    assert "save with save_checkpoint(kind=SAMPLER) or kind=BOTH" in err
    assert "Promotable steps: 4" in err
    # The registry refuses it too when named directly.
    registry = ModelRegistry(str(intact / "store"))
    with pytest.raises(NotPromotableError, match="step-2 is a STATE checkpoint.*not promotable"):
        registry.promote_checkpoint(name=registry.checkpoint_name(_job(intact), "step-2"),
                                    output_model_id="m")


def test_promoting_a_delta_checkpoint(saved: Path, tmp_path: Path, capsys):
    # A private copy: the delta snapshot and its row are added to it.
    base = tmp_path / "copy"
    shutil.copytree(saved / "run", base / "run")
    shutil.copytree(saved / "store", base / "store")
    store = CheckpointStore(str(base / "store"))
    job = _job(saved)
    entry = store.sampler_dir(job, "step-5-deadbeef")
    with store.staging_dir(entry) as local:
        Path(local, "delta.bin").write_bytes(b"\x00")
    store.commit(entry, EntryMeta(kind="sampler", name="step-5-deadbeef", job_id=job,
                                  base_model=TEST_MODEL, created_at=time.time(),
                                  snapshot_type="INFERENCE_ARC_V2"))
    jsonl = base / "run" / "checkpoints.jsonl"
    with jsonl.open("a") as f:
        f.write(json.dumps({"name": "step-5", "step": 5, "data_consumed": 20,
                            "sampler_path": "step-5-deadbeef", "source_job_id": job,
                            "base_model": TEST_MODEL}) + "\n")
    status = _promote_script().main(["--checkpoints-jsonl", str(jsonl), "--step", "5",
                                     "--output-model-id", "m", "--storage-root",
                                     str(base / "store")])
    assert status == 2
    err = capsys.readouterr().err
    assert "step-5-deadbeef is a delta snapshot (INFERENCE_ARC_V2)" in err
    assert "Save a 'base' snapshot and promote that" in err
    assert not Path(store.model_dir("local", "m")).exists()


def test_corrupt_checkpoints_jsonl_line(saved: Path, tmp_path: Path):
    base = tmp_path / "copy"
    shutil.copytree(saved, base)
    jsonl = base / "run" / "checkpoints.jsonl"
    lines = jsonl.read_text().splitlines()
    jsonl.write_text(lines[0][:-5] + "\n" + lines[1] + "\n")
    before = jsonl.read_bytes()
    with pytest.raises(ConfigError, match=r"checkpoints.jsonl:1: corrupt checkpoint row .*; fix "
                                          r"or delete that line"):
        main(_config(base))
    assert jsonl.read_bytes() == before


def _copy_saved(saved: Path, base: Path) -> str:
    shutil.copytree(saved / "run", base / "run")
    shutil.copytree(saved / "store", base / "store")
    shutil.copy(saved / "chats.jsonl", base / "chats.jsonl")
    run_json = base / "run" / "run.json"
    run_json.write_text(run_json.read_text().replace(str(saved / "store"), str(base / "store")))
    return _job(saved)


def test_corrupt_dcp_shard_falls_back_to_the_previous_checkpoint(saved: Path, tmp_path: Path,
                                                                 caplog):
    """The resume checkpoint's shard is damaged: its checksum says so, it is never loaded, and
    the run resumes from the checkpoint before it, marking the damaged one."""
    base = tmp_path
    job = _copy_saved(saved, base)
    store = CheckpointStore(str(base / "store"))
    shard = next(Path(store.state_dir(job, "step-4")).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        result = main(_config(base))
    assert "step-4: file" in caplog.text and "falling back to step-2 (step 2)" in caplog.text
    assert result.steps == 8
    rows = [json.loads(line) for line in (base / "run" / "checkpoints.jsonl").open()]
    assert [r["step"] for r in rows if r.get("state_corrupt")] == [4]


def test_corrupt_shard_of_a_state_without_checksums(saved: Path, tmp_path: Path, capsys):
    """A state saved before checksums existed: the load error names the checkpoint and the one
    to fall back to, changes nothing, and following its advice resumes."""
    base = tmp_path
    job = _copy_saved(saved, base)
    store = CheckpointStore(str(base / "store"))
    state = Path(store.state_dir(job, "step-4"))
    for checksums in state.glob("checksums.rank*.json"):
        checksums.unlink()
    shard = next(state.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    jsonl = base / "run" / "checkpoints.jsonl"
    before = jsonl.read_bytes()

    with pytest.raises(CheckpointLoadError) as excinfo:
        main(_config(base))
    message = str(excinfo.value)
    assert f"cannot resume from checkpoint step-4 (step 4, cross_job://{job}/step-4)" in message
    assert "Nothing was changed" in message
    assert (f"to resume from the previous checkpoint step-2 (step 2), delete the rows after it "
            f"from {jsonl}") in message
    assert jsonl.read_bytes() == before

    jsonl.write_text(before.decode().splitlines()[0] + "\n")  # do what the message says
    capsys.readouterr()
    result = main(_config(base))
    assert "resuming from step-2" in capsys.readouterr().out
    assert result.steps == 8


def test_missing_tokenizer(intact: Path, tmp_path: Path, tiny_model_dir: Path):
    no_tokenizer = tmp_path / "model-without-tokenizer"
    shutil.copytree(tiny_model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match=rf"tokenizer '{no_tokenizer}': the directory "
                                             rf"{no_tokenizer} has no tokenizer files .*set "
                                             rf"tokenizer_model to a directory or hub id"):
        main(_config(intact, log_path=str(tmp_path / "child"), base_model=str(no_tokenizer)))
    assert not (tmp_path / "child").exists()


def test_second_process_on_the_same_log_path(intact: Path):
    """A second live process on one log_path is refused (the first one holds run/.lock)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
         "f.seek(0); f.truncate(); f.write('4242'); f.flush(); print('locked', flush=True)\n"
         "time.sleep(60)", str(intact / "run" / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=r"run is in use by another running process \(pid "
                                                r"4242, .*\.lock\); wait for it to finish"):
            main(_config(intact))
    finally:
        holder.kill()
        holder.wait()
    # The holder rewrote the lock file's pid; restore it so `intact` compares the real data.
    (intact / "run" / ".lock").write_text(str(os.getpid()))
