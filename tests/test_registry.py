"""The model registry: checkpoint listing, promotion rules, and loading a promoted model."""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from datetime import datetime
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.sdk import (
    AdamParams,
    CheckpointStore,
    Datum,
    FireworksClient,
    ModelInput,
    ModelRegistry,
    ServiceClient,
    StoreError,
    TensorData,
    validate_output_model_id,
)
from training.sdk.models import load_causal_lm
from training.sdk.registry import (
    BaseModelMismatchError,
    CheckpointNotFoundError,
    InvalidModelIdError,
    JobNotFoundError,
    ModelExistsError,
    ModelNotFoundError,
    NotPromotableError,
)
from training.sdk.store import EntryMeta

BASE_MODEL = "homefire/tiny-qwen3-test"
NAME_RE = re.compile(r"^accounts/local/rlorTrainerJobs/(?P<job>[a-z0-9]+)/checkpoints/(?P<id>.+)$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store with one trainer job: a train state, two base snapshots and the trained weights."""
    root = tmp_path_factory.mktemp("registry") / "store"
    service = ServiceClient(storage_root=str(root), mixed_precision="no", account="local")
    client = service.create_training_client(BASE_MODEL)
    tokens = list(range(3, 19))
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": TensorData(data=tokens[1:], dtype="int64")})
    client.forward_backward([datum]).result()
    client.optim_step(AdamParams(learning_rate=1e-2)).result()
    client.save_state("step-1").result()
    snapshot = client.save_weights_for_sampler_ext("step-1").snapshot_name
    weights = {k: v.detach().clone() for k, v in client.model.state_dict().items()}
    # A second snapshot (a later step) to promote under a conflicting model id.
    client.forward_backward([datum]).result()
    client.optim_step(AdamParams(learning_rate=1e-2)).result()
    other_snapshot = client.save_weights_for_sampler_ext(
        "step-2", checkpoint_type="base").snapshot_name
    return {"root": root, "job_id": client.job_id, "snapshot": snapshot,
            "other_snapshot": other_snapshot, "weights": weights}


@pytest.fixture
def registry(trained: dict, tmp_path: Path) -> ModelRegistry:
    """A registry over a private copy of the trained store, so tests cannot see each other."""
    root = tmp_path / "store"
    shutil.copytree(trained["root"], root)
    return ModelRegistry(str(root))


def ckpt_name(trained: dict, checkpoint_id: str) -> str:
    return f"accounts/local/rlorTrainerJobs/{trained['job_id']}/checkpoints/{checkpoint_id}"


def write_snapshot(store: CheckpointStore, job_id: str, name: str, snapshot_type: str,
                   created_at: float | None = None, expires_at: float | None = None) -> None:
    """Commit a hand-made sampler snapshot (the trainer itself only writes INFERENCE_BASE)."""
    entry_dir = store.sampler_dir(job_id, name)
    with store.staging_dir(entry_dir) as local:
        Path(local, "delta.bin").write_bytes(b"\x00\x01")
    store.commit(entry_dir, EntryMeta(
        kind="sampler", name=name, job_id=job_id, base_model=BASE_MODEL,
        created_at=created_at or time.time(), expires_at=expires_at,
        snapshot_type=snapshot_type))


def tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


# ------------------------------------------------------------------ validate_output_model_id
@pytest.mark.parametrize(("model_id", "expected"), [
    ("", "is empty"),
    ("a" * 64, "64 characters long; the limit is 63"),
    ("MyModel", "'M'"),
    ("my_model", "'_'"),
    ("-my-model", "starts or ends with '-'"),
    ("my-model-", "starts or ends with '-'"),
    ("my.model", "'.'"),
])
def test_validate_output_model_id_reports_each_problem(model_id: str, expected: str) -> None:
    problems = validate_output_model_id(model_id)
    assert len(problems) == 1
    assert expected in problems[0]


def test_validate_output_model_id_hints_lowercase_and_lists_several_problems() -> None:
    assert "use lowercase" in validate_output_model_id("MyModel")[0]
    assert len(validate_output_model_id("_" + "a" * 63 + "-")) == 3


@pytest.mark.parametrize("model_id", ["a", "7", "my-model-2", "a" * 63, "qwen3-8b-sft"])
def test_validate_output_model_id_accepts_valid_ids(model_id: str) -> None:
    assert validate_output_model_id(model_id) == []


# ------------------------------------------------------------------ list_checkpoints
def test_list_checkpoints_rows_newest_first(trained: dict, registry: ModelRegistry) -> None:
    rows = registry.list_checkpoints(trained["job_id"])
    assert [NAME_RE.match(r["name"])["id"] for r in rows] == [
        trained["other_snapshot"], trained["snapshot"], "step-1"]
    for row in rows:
        assert set(row) == {"name", "createTime", "updateTime", "checkpointType", "promotable"}
        assert NAME_RE.match(row["name"])["job"] == trained["job_id"]
        assert row["createTime"].endswith("Z") and row["updateTime"] == row["createTime"]
    created = [datetime.fromisoformat(r["createTime"].replace("Z", "+00:00")) for r in rows]
    assert created == sorted(created, reverse=True)
    assert abs(created[0].timestamp() - time.time()) < 600
    assert [(r["checkpointType"], r["promotable"]) for r in rows] == [
        ("INFERENCE_BASE", True), ("INFERENCE_BASE", True), ("TRAINING_STATE", False)]


def test_list_checkpoints_types_deltas_and_hides_expired(trained: dict,
                                                         registry: ModelRegistry) -> None:
    write_snapshot(registry.store, trained["job_id"], "step-3-delta", "INFERENCE_ARC_V2")
    write_snapshot(registry.store, trained["job_id"], "step-4-gone", "INFERENCE_BASE",
                   expires_at=time.time() - 1)
    rows = {NAME_RE.match(r["name"])["id"]: r for r in registry.list_checkpoints(trained["job_id"])}
    assert rows["step-3-delta"]["checkpointType"] == "INFERENCE_ARC_V2"
    assert rows["step-3-delta"]["promotable"] is False
    assert "step-4-gone" not in rows


def test_list_checkpoints_unknown_job(registry: ModelRegistry) -> None:
    with pytest.raises(JobNotFoundError, match="no trainer job 'nosuchjob'"):
        registry.list_checkpoints("nosuchjob")


# ------------------------------------------------------------------ promotion
def test_promote_by_name_loads_with_trainer_weights(trained: dict,
                                                    registry: ModelRegistry) -> None:
    name = ckpt_name(trained, trained["snapshot"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the preferred form never warns
        model = registry.promote_checkpoint(name=name, output_model_id="tiny-sft",
                                            base_model=BASE_MODEL)
    assert model["name"] == "accounts/local/models/tiny-sft"
    assert model["source_checkpoint"] == name
    assert model["base_model"] == BASE_MODEL
    assert model["checkpointType"] == "INFERENCE_BASE"
    assert Path(model["path"]) == Path(registry.store.model_dir("local", "tiny-sft"))
    meta = registry.store.read_meta(model["path"])
    assert meta.kind == "model"
    assert meta.extra["source_job_id"] == trained["job_id"]
    assert meta.extra["source_checkpoint_id"] == trained["snapshot"]
    assert meta.extra["snapshot_type"] == "INFERENCE_BASE"
    assert meta.extra["base_model"] == BASE_MODEL
    assert meta.extra["promoted_at"] == model["createTime"]

    loaded = AutoModelForCausalLM.from_pretrained(model["path"], dtype=torch.float32)
    state = loaded.state_dict()
    assert state.keys() <= trained["weights"].keys()
    for key, value in state.items():
        assert torch.equal(value, trained["weights"][key]), key
    tokenizer = AutoTokenizer.from_pretrained(model["path"])
    input_ids = torch.tensor([tokenizer.encode("hello")])
    out = loaded.generate(input_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          pad_token_id=tokenizer.eos_token_id)
    assert out.shape == (1, input_ids.shape[1] + 4)

    # The registry name works wherever a base_model is accepted.
    via_name = load_causal_lm(model["name"], registry.store)
    assert torch.equal(via_name.state_dict()["model.norm.weight"], state["model.norm.weight"])
    assert registry.get_model("tiny-sft") == model
    assert registry.get_model(model["name"]) == model
    assert registry.model_path(model["name"]) == model["path"]
    assert registry.list_models() == [model]


@pytest.mark.parametrize("form", ["positional", "keywords"])
def test_legacy_form_warns_and_promotes(trained: dict, registry: ModelRegistry, form: str) -> None:
    with pytest.warns(DeprecationWarning, match=r"positional form is deprecated.*name="):
        if form == "positional":
            model = registry.promote_checkpoint(trained["job_id"], trained["snapshot"],
                                                "legacy-model", BASE_MODEL)
        else:
            model = registry.promote_checkpoint(job_id=trained["job_id"],
                                                checkpoint_id=trained["snapshot"],
                                                output_model_id="legacy-model")
    assert model["name"] == "accounts/local/models/legacy-model"
    assert model["source_checkpoint"] == ckpt_name(trained, trained["snapshot"])
    assert (Path(model["path"]) / "config.json").is_file()


def test_hot_load_deployment_id_warns_and_is_ignored(trained: dict,
                                                     registry: ModelRegistry) -> None:
    with pytest.warns(DeprecationWarning) as record:
        model = registry.promote_checkpoint(name=ckpt_name(trained, trained["snapshot"]),
                                            output_model_id="hot", hot_load_deployment_id="d1")
    assert len(record) == 1  # only the hot-load warning: the name= form is not deprecated
    assert "promote_checkpoint(hot_load_deployment_id=...) is deprecated" in str(record[0].message)
    assert model["name"] == "accounts/local/models/hot"


def test_fireworks_client_alias_ignores_api_key(trained: dict, registry: ModelRegistry) -> None:
    client = FireworksClient(registry.store, api_key="fw_unused", base_url="https://unused")
    assert isinstance(client, ModelRegistry)
    assert len(client.list_checkpoints(trained["job_id"])) == 3
    for key in ("fw_secret123", "sk-live-abc", "a1b2c3"):  # any key given positionally
        with pytest.raises(StoreError, match=r"no checkpoint store at .*an API key goes in "
                                             r"api_key="):
            FireworksClient(key)
        assert not Path(key).exists()


@pytest.mark.parametrize("checkpoint", ["snapshot", "step-1", "no-such-checkpoint"])
def test_invalid_model_id_refused_before_anything_is_written(
        trained: dict, registry: ModelRegistry, checkpoint: str) -> None:
    root = Path(registry.store.root)
    before = tree(root)
    name = ckpt_name(trained, trained.get(checkpoint, checkpoint))
    with pytest.raises(InvalidModelIdError, match=r"'My_Model'.*'M', '_'"):
        registry.promote_checkpoint(name=name, output_model_id="My_Model")
    assert tree(root) == before
    assert not (root / "models").exists()


def test_state_checkpoint_refused(trained: dict, registry: ModelRegistry) -> None:
    with pytest.raises(NotPromotableError) as excinfo:
        registry.promote_checkpoint(name=ckpt_name(trained, "step-1"), output_model_id="m")
    message = str(excinfo.value)
    assert "step-1 is a STATE checkpoint" in message
    assert "DCP (optimizer + weights)" in message
    assert "kind=SAMPLER or kind=BOTH" in message
    assert not Path(registry.store.model_dir("local", "m")).exists()


def test_delta_snapshot_refused(registry: ModelRegistry) -> None:
    client = ServiceClient(registry.store.root, mixed_precision="no").create_training_client(
        BASE_MODEL)
    client.save_weights_for_sampler_ext("step-0")  # the base the delta is built on
    with torch.no_grad():
        client.model.model.norm.weight.add_(1e-3)
    delta = client.save_weights_for_sampler_ext("step-3")  # the default after a base: a delta
    assert registry.store.get_sampler(client.job_id, delta.snapshot_name).snapshot_type == \
        "INFERENCE_ARC_V2"
    with pytest.raises(NotPromotableError) as excinfo:
        registry.promote_checkpoint(name=registry.checkpoint_name(client.job_id,
                                                                  delta.snapshot_name),
                                    output_model_id="m")
    message = str(excinfo.value)
    assert "INFERENCE_ARC_V2" in message and "a diff over an earlier base" in message
    assert "save_checkpoint(kind=SAMPLER or BOTH)" in message
    assert "checkpoint_type='base'" in message
    assert not Path(registry.store.model_dir("local", "m")).exists()


def test_unknown_checkpoint_names_what_exists(trained: dict, registry: ModelRegistry) -> None:
    with pytest.raises(CheckpointNotFoundError) as excinfo:
        registry.promote_checkpoint(name=ckpt_name(trained, "step-9-deadbeef"),
                                    output_model_id="m")
    message = str(excinfo.value)
    assert "no checkpoint 'step-9-deadbeef'" in message
    assert trained["snapshot"] in message and trained["other_snapshot"] in message
    with pytest.raises(JobNotFoundError):
        registry.promote_checkpoint(
            name="accounts/local/rlorTrainerJobs/nosuchjob/checkpoints/x", output_model_id="m")
    with pytest.raises(CheckpointNotFoundError, match="belongs to account 'local', not 'other'"):
        registry.promote_checkpoint(
            name=ckpt_name(trained, trained["snapshot"]).replace("/local/", "/other/"),
            output_model_id="m")
    with pytest.raises(ValueError, match="is not of the form"):
        registry.promote_checkpoint(name="accounts/local/checkpoints/x", output_model_id="m")


def test_repromotion_is_idempotent_and_replaces_a_half_copy(trained: dict,
                                                            registry: ModelRegistry) -> None:
    model_dir = Path(registry.store.model_dir("local", "again"))
    model_dir.mkdir(parents=True)
    (model_dir / "partial.safetensors").write_bytes(b"torn")  # a killed earlier attempt
    name = ckpt_name(trained, trained["snapshot"])
    first = registry.promote_checkpoint(name=name, output_model_id="again")
    assert not (model_dir / "partial.safetensors").exists()
    files = tree(model_dir)
    second = registry.promote_checkpoint(name=name, output_model_id="again")
    assert second == first
    assert tree(model_dir) == files  # nothing was copied again


def test_conflicting_model_id_refused(trained: dict, registry: ModelRegistry) -> None:
    first = ckpt_name(trained, trained["snapshot"])
    registry.promote_checkpoint(name=first, output_model_id="taken")
    with pytest.raises(ModelExistsError, match=rf"already exists, promoted from {first}"):
        registry.promote_checkpoint(name=ckpt_name(trained, trained["other_snapshot"]),
                                    output_model_id="taken")
    assert registry.get_model("taken")["source_checkpoint"] == first


def test_base_model_mismatch_refused(trained: dict, registry: ModelRegistry) -> None:
    with pytest.raises(BaseModelMismatchError,
                       match=r"'accounts/fireworks/models/qwen3-8b'.*'homefire/tiny-qwen3-test'"):
        registry.promote_checkpoint(name=ckpt_name(trained, trained["snapshot"]),
                                    output_model_id="m",
                                    base_model="accounts/fireworks/models/qwen3-8b")
    assert not Path(registry.store.model_dir("local", "m")).exists()


def test_account_option_and_model_lookup_errors(trained: dict, registry: ModelRegistry) -> None:
    team = ModelRegistry(registry.store, account="team")
    model = team.promote_checkpoint(name=ckpt_name(trained, trained["snapshot"]),
                                    output_model_id="shared")
    assert model["name"] == "accounts/team/models/shared"
    assert team.get_model("shared") == model
    assert registry.list_models() == [model]  # no account given: every account's models
    with pytest.raises(ModelNotFoundError, match="no promoted model accounts/local/models/shared"):
        registry.get_model("shared")


def test_promotion_on_a_remote_store() -> None:
    """A non-local fsspec store stages locally and uploads; meta.json is never copied."""
    store = CheckpointStore(f"memory://registry-test-{os.getpid()}-{time.time_ns()}")
    job = store.create_job(BASE_MODEL)
    write_snapshot(store, job.job_id, "step-1-cafe0001", "INFERENCE_LORA")
    registry = ModelRegistry(store)
    model = registry.promote_checkpoint(
        name=registry.checkpoint_name(job.job_id, "step-1-cafe0001"), output_model_id="remote")
    assert model["path"].startswith("memory://")
    assert model["checkpointType"] == "INFERENCE_LORA"
    model_dir = store.model_dir(job.account, "remote")
    assert store.fs.cat(f"{model_dir}/delta.bin") == b"\x00\x01"
    assert store.read_meta(model_dir).extra["source_checkpoint_id"] == "step-1-cafe0001"
