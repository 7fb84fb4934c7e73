"""A run never trains on, saves or promotes garbage: non-finite values are refused or stopped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.recipes.sft_loop import Config, main
from training.sdk import (
    AdamParams,
    Datum,
    ModelInput,
    ModelRegistry,
    NonFiniteWeightsError,
)
from training.utils import ConfigError, InfraConfig
from training.utils.metrics import read_metrics
from training.utils.run import NonFiniteStepError

from .conftest import TEST_MODEL, checkpoint_rows


def _config(tmp_path: Path, log_name: str = "run", **overrides) -> Config:
    fields = dict(log_path=str(tmp_path / log_name), base_model=TEST_MODEL, batch_size=4,
                  max_steps=6, dcp_save_interval=2, seed=3,
                  infra=InfraConfig(storage_root=str(tmp_path / "store"), num_threads=1,
                                    mixed_precision="no"))
    fields.update(overrides)
    return Config(**fields)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("learning_rate", float("nan"), "learning_rate must be a finite number > 0, got nan"),
    ("learning_rate", float("inf"), "learning_rate must be a finite number > 0, got inf"),
    ("learning_rate", -1e-3, "learning_rate must be a finite number > 0"),
    ("adam_beta1", 1.0, r"adam_beta1 must be a finite number in \[0, 1\)"),
    ("adam_beta2", float("nan"), "adam_beta2 must be a finite number"),
    ("adam_eps", 0.0, "adam_eps must be a finite number > 0"),
    ("weight_decay", float("-inf"), "weight_decay must be a finite number >= 0"),
    ("grad_clip_norm", float("nan"), "grad_clip_norm must be a finite number >= 0"),
    ("warmup_steps", -1, "warmup_steps must be a finite number >= 0"),
    ("non_finite_policy", "ignore", "non_finite_policy='ignore': expected one of error, skip"),
])
def test_non_finite_and_out_of_range_settings_are_refused(tmp_path, field, value, match):
    with pytest.raises(ConfigError, match=match):
        main(_config(tmp_path, **{field: value}))
    assert not (tmp_path / "store").exists()  # refused before anything was loaded


def test_optim_step_after_a_non_finite_backward_leaves_the_weights(make_client):
    client = make_client()
    tokens = list(range(5, 25))
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": tokens[1:]})
    client.forward_backward([datum]).result()
    client.optim_step(AdamParams(learning_rate=1e-3)).result()
    before = {n: p.detach().clone() for n, p in client.model.named_parameters()}
    moments = {k: v.clone() for k, v in client._optimizer.state[
        next(iter(client._optimizer.state))].items()}
    client.forward_backward_custom([datum], lambda d, lp: (lp[0].sum() * float("nan"), {}))
    result = client.optim_step(AdamParams(learning_rate=1e-3)).result()
    assert result.metrics["non_finite"] == 1.0 and math.isnan(result.metrics["grad_norm"])
    assert client.step == 1  # not counted as a step
    assert all(torch.equal(p, before[n]) for n, p in client.model.named_parameters())
    after = client._optimizer.state[next(iter(client._optimizer.state))]
    assert all(torch.equal(after[k], moments[k]) for k in moments)
    # The bad gradients were dropped: the next step trains normally.
    client.forward_backward([datum]).result()
    assert client.optim_step(AdamParams(learning_rate=1e-3)).result().metrics["non_finite"] == 0
    with pytest.raises(ValueError, match="AdamParams.learning_rate=nan is out of range"):
        client.optim_step(AdamParams(learning_rate=float("nan")))


def test_a_diverging_run_stops_naming_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    config = _config(tmp_path, learning_rate=1e30, grad_clip_norm=0.0, output_model_id="nan-model")
    with pytest.raises(NonFiniteStepError, match=r"step \d+: .*nan; the update was not applied.*"
                                                 r"(The last good checkpoint is step-\d+|No "
                                                 r"checkpoint was saved yet)"):
        main(config)
    rows = checkpoint_rows(config.log_path)
    stopped = read_metrics(config.log_path)[-1]
    assert stopped["skipped_non_finite"] == 1
    assert all(r["step"] < stopped["step"] for r in rows)  # nothing saved after the bad step
    assert not any(r.get("sampler_path") for r in rows)
    assert not (tmp_path / "store" / "models").exists()  # nothing promoted


def test_skip_policy_goes_on_and_stops_after_too_many_in_a_row(tmp_path, tiny_model_dir):
    config = _config(tmp_path, learning_rate=1e30, grad_clip_norm=0.0,
                     non_finite_policy="skip", max_non_finite_steps=2)
    with pytest.raises(NonFiniteStepError, match="2 steps in a row were non-finite"):
        main(config)
    metrics = read_metrics(config.log_path)
    assert [m.get("skipped_non_finite", 0) for m in metrics][-2:] == [1, 1]


def test_sampler_saves_and_promotion_refuse_non_finite_weights(make_client, store_root):
    client = make_client()
    saved = client.save_weights_for_sampler_ext("good", checkpoint_type="base")
    with torch.no_grad():
        next(client.model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"sampler snapshot 'bad-.*' of job .*: "
                                                    r"tensor '.*' has 1 NaN/infinite values"):
        client.save_weights_for_sampler_ext("bad", checkpoint_type="base")
    # A snapshot whose file was damaged into NaN (or saved by an older version) is not promoted.
    entry = Path(client.store.sampler_dir(client.job_id, saved.snapshot_name))
    weights_file = next(entry.glob("*.safetensors"))
    tensors = load_file(str(weights_file))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    registry = ModelRegistry(client.store)
    (entry / "weights_manifest.json").unlink(missing_ok=True)
    with pytest.raises(NonFiniteWeightsError, match=f"promoting .*tensor '{name}'"):
        registry.promote_checkpoint(name=registry.checkpoint_name(client.job_id,
                                                                  saved.snapshot_name),
                                    output_model_id="inf-model")
    assert not (Path(store_root) / "models" / "accounts").exists() or not any(
        (Path(store_root) / "models").rglob("meta.json"))


# ---------------------------------------------------------------- run identity
def test_a_changed_hyperparameter_is_refused_with_a_table(tmp_path, tiny_model_dir):
    main(_config(tmp_path, max_steps=4))
    with pytest.raises(ConfigError) as refused:
        main(_config(tmp_path, max_steps=4, learning_rate=0.01, adam_beta2=0.99))
    message = str(refused.value)
    assert "learning_rate  saved 0.001" in message and "new 0.01" in message
    assert "adam_beta2" in message and "resume_overrides=[learning_rate,adam_beta2]" in message
    with pytest.raises(ConfigError, match=r"resume_overrides names \['lerning_rate'\]"):
        main(_config(tmp_path, max_steps=4, resume_overrides=["lerning_rate"]))


def test_resume_overrides_extend_a_run_and_keep_the_history(tmp_path, tiny_model_dir):
    import json as json_module

    first = main(_config(tmp_path, max_steps=4))
    assert checkpoint_rows(first.log_path)[-1]["step"] == 4
    extended = main(_config(tmp_path, max_steps=8, learning_rate=5e-4,
                            resume_overrides=["max_steps", "learning_rate"]))
    assert checkpoint_rows(extended.log_path)[-1]["step"] == 8
    run = json_module.loads((Path(extended.log_path) / "run.json").read_text())
    assert run["max_steps"] == 8 and run["learning_rate"] == 5e-4
    assert [(h["field"], h["from"], h["to"], h["from_step"]) for h in run["history"]] == [
        ("learning_rate", 0.001, 5e-4, 4), ("max_steps", 4, 8, 4)]
    lrs = [m["learning_rate"] for m in read_metrics(extended.log_path)]
    assert lrs[4] < 5e-4 + 1e-12  # steps 5-8 ran with the new peak learning rate
    # A third run with the extended settings resumes as the same run: nothing to refuse.
    again = main(_config(tmp_path, max_steps=8, learning_rate=5e-4))
    assert again.already_complete


# ---------------------------------------------------------------- bad inputs, clear errors
@pytest.mark.parametrize(("overrides", "match"), [
    ({"init_from_checkpoint": "../../etc:step-1"}, r"init_from_checkpoint='../../etc:step-1'.*"
                                                    r"invalid job id '../../etc'"),
    ({"init_from_checkpoint": "job:../x"}, r"invalid checkpoint name '../x'"),
    ({"infra": InfraConfig(num_threads=0)}, "infra.num_threads must be >= 1"),
    ({"infra": InfraConfig(device="gpu")}, r"infra.device='gpu': expected 'auto', 'cpu'"),
])
def test_bad_settings_are_named_before_anything_runs(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        main(_config(tmp_path, **overrides))
    assert not (tmp_path / "store").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without "
                                                      "CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="infra.device='cuda' but this machine has no usable "
                                          "CUDA GPU"):
        main(_config(tmp_path, infra=InfraConfig(device="cuda")))


def test_a_log_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"log_path='.*run' is a file"):
        main(_config(tmp_path))


def test_damaged_run_files_and_records_are_named(tmp_path, tiny_model_dir):
    from training.sdk.store import CheckpointStore, JobNotFoundError, StoreError

    result = main(_config(tmp_path, max_steps=4))
    log = Path(result.log_path)
    run_json = log / "run.json"
    good = run_json.read_text()
    run_json.write_text(good[: len(good) // 2])  # truncated
    with pytest.raises(ConfigError, match=r"run.json is damaged .*Restore it, or delete it"):
        main(_config(tmp_path, max_steps=4))
    run_json.write_text(good)
    rows = checkpoint_rows(log)
    job = rows[0]["source_job_id"]
    store = CheckpointStore(str(tmp_path / "store"))
    meta = Path(store.state_dir(job, "step-2")) / "meta.json"
    meta_text = meta.read_text()
    meta.write_text("[1, 2, 3]")
    with pytest.raises(StoreError, match=r"step-2/meta.json is not a checkpoint record"):
        store.get_state(job, "step-2")
    meta.write_text(meta_text)
    job_json = Path(store.job_dir(job)) / "job.json"
    job_text = job_json.read_text()
    job_json.unlink()
    with pytest.raises(JobNotFoundError, match=rf"trainer job '{job}' has a directory .* but no "
                                               r"job.json"):
        store.get_job(job)
    job_json.write_text(job_text)
    # checkpoints.jsonl lost while run.json names a job with committed states: said, not reset.
    (log / "checkpoints.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"checkpoints.jsonl is missing or has no resumable "
                                          r"row, but .*run.json records trainer job .*step-2"):
        main(_config(tmp_path, max_steps=4))


def test_tool_call_arguments_that_are_not_json_are_refused(tmp_path):
    from training.utils.data import DatasetError

    bad = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": "{city: Paris"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}]}
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DatasetError, match=r"tools.jsonl:1: .*function.arguments is not valid "
                                           r"JSON"):
        main(_config(tmp_path, dataset=str(data)))


# ---------------------------------------------------------------- verified train states
def test_a_silently_corrupted_state_is_never_trained_on(tmp_path, tiny_model_dir, caplog):
    from training.sdk import ServiceClient
    from training.sdk.store import CheckpointStore
    from training.sdk.training_client import StateCorruptError

    from .conftest import final_sampler_weights

    reference = main(_config(tmp_path, "reference", max_steps=8, dcp_save_interval=2))
    config = _config(tmp_path, "damaged", max_steps=8, dcp_save_interval=2)
    main(config)
    log = Path(config.log_path)
    rows = checkpoint_rows(log)
    # As if the run had been killed after step 6, and then 4 KiB of its step-6 state rotted.
    (log / "checkpoints.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in rows if r["step"] <= 6))
    job = rows[0]["source_job_id"]
    store = CheckpointStore(str(tmp_path / "store"))
    shard = max(Path(store.state_dir(job, "step-6")).glob("*.distcp"),
                key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    shard.write_bytes(bytes(data))  # same size, different bytes
    # An explicit load of the corrupt state fails naming it.
    client = ServiceClient(str(tmp_path / "store"), device="cpu", mixed_precision="no") \
        .create_training_client(TEST_MODEL)
    with pytest.raises(StateCorruptError, match=rf"train state {job}:step-6: file .* does not "
                                                r"match the checksum"):
        client.load_state(f"cross_job://{job}/step-6")
    # The rerun resumes from the intact step-4 instead, and ends where an intact run ends.
    with caplog.at_level("WARNING"):
        resumed = main(config)
    assert "step-6: file" in caplog.text and "falling back to step-4" in caplog.text
    ref_w = final_sampler_weights(tmp_path, reference.log_path)
    got_w = final_sampler_weights(tmp_path, resumed.log_path)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)  # bitwise: never trained on it


def test_metrics_rows_are_made_durable_before_each_checkpoint(tmp_path, tiny_model_dir,
                                                             monkeypatch):
    from training.utils.checkpoints import TrainingCheckpoints
    from training.utils.metrics import MetricsLogger

    events: list[tuple[str, int]] = []
    sync, save = MetricsLogger.sync, TrainingCheckpoints.save

    def recording_sync(self):
        rows = self.path.read_text().splitlines()
        events.append(("sync", json.loads(rows[-1])["step"]))
        sync(self)

    def recording_save(self, name, **kwargs):
        events.append(("save", kwargs["step"]))
        return save(self, name, **kwargs)

    monkeypatch.setattr(MetricsLogger, "sync", recording_sync)
    monkeypatch.setattr(TrainingCheckpoints, "save", recording_save)
    main(_config(tmp_path, max_steps=5, dcp_save_interval=2))
    assert events == [("sync", 2), ("save", 2), ("sync", 4), ("save", 4), ("sync", 5),
                      ("save", 5)]


def _flip_a_tensor_byte(path: Path) -> None:
    """Change one byte of tensor data (the header stays valid, so the file still loads)."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_corrupted_sampler_snapshot_is_never_promoted_or_served(store_root, tiny_model_dir,
                                                                  lora_rank):
    from training.sdk import DeploymentManager, HotloadError, ModelRegistry, ServiceClient
    from training.sdk.snapshots import SnapshotCorruptError

    client = ServiceClient(store_root, device="cpu", mixed_precision="no") \
        .create_training_client(TEST_MODEL, lora_rank=lora_rank)
    saved = client.save_weights_for_sampler_ext("final", checkpoint_type="base")
    snapshot_dir = Path(store_root) / "jobs" / client.job_id / "samplers" / saved.snapshot_name
    weights_file = next(snapshot_dir.glob("*.safetensors"))
    assert (snapshot_dir / "weights_manifest.json").exists()  # adapters are checksummed too
    _flip_a_tensor_byte(weights_file)
    registry = ModelRegistry(client.store)
    with pytest.raises(SnapshotCorruptError, match="fails its checksum"):
        registry.promote_checkpoint(
            name=registry.checkpoint_name(client.job_id, saved.snapshot_name),
            output_model_id="corrupt", base_model=TEST_MODEL)
    assert registry.list_models() == []
    manager = DeploymentManager(client.store, device="cpu")
    manager.create_or_get(TEST_MODEL, "serve")
    with pytest.raises(HotloadError, match="refused, it keeps serving the base model: .*fails "
                                           "its checksum"):
        manager.sync("serve", saved.path)
