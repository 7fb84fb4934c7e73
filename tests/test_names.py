"""training.sdk.names: every name grammar in one place, and none lets a path escape the store."""

from __future__ import annotations

import pytest

from training.sdk import names
from training.sdk.snapshots import parse_snapshot_identity as old_snapshot_path
from training.sdk.store import parse_checkpoint_ref as old_store_path


def test_one_reference_parser_for_train_states_and_snapshots():
    assert names.parse_checkpoint_ref("cross_job://job1/step-4") == ("job1", "step-4")
    assert names.parse_checkpoint_ref("tinker://job1/weights/step-4") == ("job1", "step-4")
    assert names.parse_checkpoint_ref("job1:step-4") == ("job1", "step-4")
    assert names.parse_checkpoint_ref("step-4", default_job_id="j") == ("j", "step-4")
    assert names.parse_snapshot_identity("sampler://job1/s-1a2b3c4d") == ("job1", "s-1a2b3c4d")
    assert names.parse_snapshot_identity("tinker://job1/sampler_weights/s") == ("job1", "s")
    with pytest.raises(ValueError, match="is a sampler snapshot, not a train state"):
        names.parse_checkpoint_ref("tinker://job1/sampler_weights/s")
    with pytest.raises(ValueError, match="is a train state, not a sampler snapshot"):
        names.parse_snapshot_identity("tinker://job1/weights/step-4")
    with pytest.raises(ValueError, match="names no trainer job"):
        names.parse_checkpoint_ref("step-4")
    with pytest.raises(ValueError, match="invalid checkpoint name 'a/b'"):
        names.parse_checkpoint_ref("cross_job://job1/a/b")
    with pytest.raises(ValueError, match="is incomplete"):
        names.parse_snapshot_identity("sampler://job1/")
    # The old import paths are the same functions.
    assert old_store_path is names.parse_checkpoint_ref
    assert old_snapshot_path is names.parse_snapshot_identity


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "", ".hidden", "x" * 129])
def test_store_names_cannot_escape_or_collide(bad):
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        names.validate_name(bad)
    with pytest.raises(ValueError):
        names.parse_tinker_path(f"tinker://job1/weights/{bad}")


def test_resource_names_round_trip():
    name = names.checkpoint_resource_name("local", "job1", "step-4")
    assert names.parse_checkpoint_resource_name(name) == ("local", "job1", "step-4")
    with pytest.raises(ValueError):
        names.parse_checkpoint_resource_name("accounts/../rlorTrainerJobs/j/checkpoints/c")
    assert names.parse_model_name(names.model_resource_name("local", "m-1")) == ("local", "m-1")
    assert names.parse_model_name("Qwen/Qwen3-0.6B") is None
    assert names.validate_output_model_id("my-model") == []
    assert names.validate_output_model_id("My_Model")[0].startswith("output_model_id 'My_Model'")
