"""scripts/promote_checkpoint.py: picking the row of checkpoints.jsonl and promoting it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.sdk import (
    AdamParams,
    Datum,
    ModelInput,
    ModelRegistry,
    ServiceClient,
    TensorData,
    validate_output_model_id,
)
from training.utils.checkpoints import CheckpointRow

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "promote_checkpoint.py"
BASE_MODEL = "homefire/tiny-qwen3-test"

# scripts/ is not a package: load the script file itself, as `python scripts/...` would.
_spec = importlib.util.spec_from_file_location("promote_checkpoint", SCRIPT)
promote_checkpoint = importlib.util.module_from_spec(_spec)
sys.modules["promote_checkpoint"] = promote_checkpoint  # dataclasses look their module up
_spec.loader.exec_module(promote_checkpoint)
main = promote_checkpoint.main
LocatedRow = promote_checkpoint.LocatedRow
default_output_model_id = promote_checkpoint.default_output_model_id


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store whose job saved: state step-1, BOTH at step 2, state step-3, SAMPLER at step 4."""
    root = tmp_path_factory.mktemp("script") / "store"
    client = ServiceClient(storage_root=str(root), mixed_precision="no").create_training_client(
        BASE_MODEL)
    tokens = list(range(5, 21))
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": TensorData(data=tokens[1:], dtype="int64")})
    job = client.job_id
    rows = []
    for step in range(1, 5):
        client.forward_backward([datum]).result()
        client.optim_step(AdamParams(learning_rate=1e-2)).result()
        row = {"name": f"step-{step}", "step": step, "data_consumed": 4 * step,
               "source_job_id": job, "base_model": BASE_MODEL}
        if step != 4:
            row["state_path"] = client.save_state(f"step-{step}").result().path
        if step in (2, 4):
            row["sampler_path"] = client.save_weights_for_sampler_ext(
                f"step-{step}", checkpoint_type="base").snapshot_name
        rows.append(row)
    # A resumed run re-saved step 2 as STATE only: --step 2 must still find the sampler row.
    rows.append({"name": "step-2", "step": 2, "data_consumed": 8, "source_job_id": job,
                 "state_path": f"cross_job://{job}/step-2", "base_model": BASE_MODEL})
    return {"root": root, "job_id": job, "rows": rows}


@pytest.fixture
def run(trained: dict, tmp_path: Path) -> dict:
    """A private copy of the store and a log dir ``my_Run`` holding checkpoints.jsonl."""
    root = tmp_path / "store"
    shutil.copytree(trained["root"], root)
    log_dir = tmp_path / "my_Run"
    log_dir.mkdir()
    jsonl = log_dir / "checkpoints.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in trained["rows"]))
    return {"root": root, "jsonl": jsonl, "rows": trained["rows"]}


def sampler_of(run: dict, step: int) -> str:
    return next(r["sampler_path"] for r in run["rows"] if r["step"] == step and "sampler_path" in r)


def test_promotes_latest_promotable_row_with_default_id(run: dict, capsys) -> None:
    code = main(["--checkpoints-jsonl", str(run["jsonl"]), "--storage-root", str(run["root"])])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "using 'my-run-step-4'" in out
    model = ModelRegistry(str(run["root"])).get_model("my-run-step-4")
    assert model["source_checkpoint"].endswith("/checkpoints/" + sampler_of(run, 4))
    assert f"model: {model['name']}" in out
    assert f"path:  {model['path']}" in out
    assert f"AutoModelForCausalLM.from_pretrained({model['path']!r})" in out
    assert (Path(model["path"]) / "config.json").is_file()


def test_promotes_chosen_step_preferring_its_sampler_row(run: dict, capsys) -> None:
    code = main(["--checkpoints-jsonl", str(run["jsonl"]), "--storage-root", str(run["root"]),
                 "--step", "2", "--output-model-id", "chosen"])
    assert code == 0, capsys.readouterr().err
    model = ModelRegistry(str(run["root"])).get_model("chosen")
    assert model["source_checkpoint"].endswith("/checkpoints/" + sampler_of(run, 2))


def test_state_only_step_refused(run: dict, capsys) -> None:
    code = main(["--checkpoints-jsonl", str(run["jsonl"]), "--storage-root", str(run["root"]),
                 "--step", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"step 3 ({run['jsonl']}:3) is a STATE-only checkpoint" in err
    assert "kind=SAMPLER" in err and "Promotable steps: 2, 4" in err
    assert "Traceback" not in err
    assert not (run["root"] / "models").exists()


def test_missing_step_and_no_promotable_rows(run: dict, capsys) -> None:
    args = ["--checkpoints-jsonl", str(run["jsonl"]), "--storage-root", str(run["root"])]
    assert main([*args, "--step", "7"]) == 2
    assert "no row for step 7; steps saved: 1, 2, 3, 4, 2" in capsys.readouterr().err
    run["jsonl"].write_text(json.dumps(run["rows"][0]) + "\n")
    assert main(args) == 2
    assert "no promotable checkpoint" in capsys.readouterr().err


def test_torn_last_line_is_tolerated(run: dict, capsys) -> None:
    with run["jsonl"].open("a") as f:
        f.write('{"name": "step-5", "step": 5, "sampler_pa')  # a crash mid-append
    code = main(["--checkpoints-jsonl", str(run["jsonl"]), "--storage-root", str(run["root"]),
                 "--output-model-id", "torn"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"warning: ignoring {run['jsonl']}:6" in err
    assert "model: accounts/local/models/torn" in out


def test_corrupt_middle_line_is_an_error(run: dict, capsys) -> None:
    lines = run["jsonl"].read_text().splitlines()
    lines[2] = lines[2][:20]
    run["jsonl"].write_text("\n".join(lines) + "\n")
    code = main(["--checkpoints-jsonl", str(run["jsonl"]), "--storage-root", str(run["root"])])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{run['jsonl']}:3 is not valid JSON" in err
    assert "Traceback" not in err


def test_bad_output_model_id_and_unknown_store(run: dict, capsys) -> None:
    args = ["--checkpoints-jsonl", str(run["jsonl"])]
    assert main([*args, "--storage-root", str(run["root"]), "--output-model-id", "Bad_Id"]) == 2
    assert "'B', 'I', '_'" in capsys.readouterr().err
    assert not (run["root"] / "models").exists()
    missing = run["root"].parent / "typo"
    assert main([*args, "--storage-root", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists()


def test_default_output_model_id_is_valid() -> None:
    row = LocatedRow(CheckpointRow.from_dict({"step": 50, "sampler_path": "step-50-a1b2c3d4"}), "x:1")
    assert default_output_model_id(Path("/runs/My_Training Run"), row) == (
        "my-training-run-step-50")
    long_id = default_output_model_id(Path("/runs/" + "Run_" * 30), row)
    assert long_id.endswith("-step-50")
    assert validate_output_model_id(long_id) == []
    stepless = LocatedRow(CheckpointRow.from_dict({"sampler_path": "final-a1b2c3d4"}), "x:1")
    assert default_output_model_id(Path("/runs/__"), stepless) == "model-final-a1b2c3d4"


def test_script_runs_as_a_file_with_store_from_run_json(run: dict) -> None:
    """The real command line: repo root not on sys.path, store root taken from run.json."""
    (run["jsonl"].parent / "run.json").write_text(json.dumps({"storage_root": str(run["root"])}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, str(SCRIPT), "--checkpoints-jsonl", str(run["jsonl"]),
               "--output-model-id", "from-run-json"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"store: {run['root']} (run.json)" in done.stdout
    assert "model: accounts/local/models/from-run-json" in done.stdout
    assert ModelRegistry(str(run["root"])).get_model("from-run-json")

    refused = subprocess.run([*command, "--step", "3"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "STATE-only" in refused.stderr and "Traceback" not in refused.stderr
