"""The RL recipe end to end: rollouts from the synced deployment, metrics, exact resume (on- and
off-policy), the KL reference, bad inputs, and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.recipes.rl_loop import Config, main
from training.sdk.store import CheckpointStore
from training.utils import ConfigError, InfraConfig
from training.utils.data import DatasetError
from training.utils.metrics import read_metrics
from training.utils.rewards import RewardError
from training.utils.rl_data import read_rollouts

from .conftest import TEST_MODEL, checkpoint_rows, final_sampler_weights

REPO = Path(__file__).resolve().parent.parent


def _prompts(tmp_path: Path) -> str:
    """Prompts scored by the fraction of vowels: a dense reward, so almost every group of the
    random test model has reward variance and trains."""
    path = tmp_path / "prompts.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({
            "messages": [{"role": "user", "content": f"Say {n} words with many vowels."}],
            "pattern": "(?i)[aeiou]"}) + "\n" for n in range(12)))
    return str(path)


def _config(tmp_path: Path, log_name: str = "run", **overrides) -> Config:
    fields = dict(log_path=str(tmp_path / log_name), base_model=TEST_MODEL, batch_size=2,
                  dataset=_prompts(tmp_path),
                  group_size=4, max_completion_tokens=6, max_steps=4, learning_rate=5e-3,
                  seed=5, infra=InfraConfig(storage_root=str(tmp_path / "store"),
                                            num_threads=1, mixed_precision="no"))
    fields.update(overrides)
    return Config(**fields)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_run_logs_rollouts_and_metrics_and_syncs_every_step(tmp_path):
    result = main(_config(tmp_path, dcp_save_interval=2))
    assert [r["step"] for r in checkpoint_rows(result.log_path)] == [2, 4]
    metrics = read_metrics(result.log_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        for key in ("reward_mean", "reward_std", "filtered_group_fraction", "entropy",
                    "response_length", "sample_tokens_per_s"):
            assert key in m, key
        assert 0 <= m["filtered_group_fraction"] <= 1 and m["data_consumed"] == 2 * m["step"]
        if m["trained_sequences"]:
            assert {"clip_fraction", "train_tokens_per_s", "loss", "grad_norm"} <= m.keys()
            # Trainer and engine agree on the sampled tokens' log-probs (fp32 on both): a
            # misaligned datum (off by one position) would put this far from 1.
            assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    # Step k samples from the snapshot synced after k - 1 optimizer steps.
    assert [m["sampled_from"].split("/")[-1].rsplit("-", 1)[0] for m in metrics] == [
        "rl-sync-0", "rl-sync-1", "rl-sync-2", "rl-sync-3"]
    rollouts = read_rollouts(result.log_path)
    assert len(rollouts) == 4 * 2 * 4
    assert [r["step"] for r in rollouts[:8]] == [1] * 8
    first = rollouts[:8]
    assert sum(r["reward"] for r in first) / 8 == pytest.approx(metrics[0]["reward_mean"])
    assert all(r["num_tokens"] <= 6 and r["prompt"] for r in rollouts)
    # Only the newest sync snapshot is kept in the store (besides the final checkpoint's).
    job = checkpoint_rows(result.log_path)[-1]["source_job_id"]
    names = [m.name for m in CheckpointStore(str(tmp_path / "store")).list_samplers(job)]
    assert len([n for n in names if n.startswith("rl-sync-")]) == 1, names


@pytest.mark.parametrize("off_policy", [False, True])
def test_resume_from_a_state_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, off_policy):
    reference = main(_config(tmp_path, "reference", dcp_save_interval=2, max_steps=5,
                             off_policy=off_policy))

    # The same run rolled back to its step-2 checkpoint, as if it had crashed after it.
    interrupted = _config(tmp_path, "interrupted", dcp_save_interval=2, max_steps=5,
                          off_policy=off_policy)
    main(interrupted)
    log = Path(interrupted.log_path)
    first_attempt = read_metrics(log)
    (log / "checkpoints.jsonl").write_text(json.dumps(checkpoint_rows(log)[0]) + "\n")
    resumed = main(interrupted)

    ref_w, got_w = final_sampler_weights(tmp_path, reference.log_path), final_sampler_weights(tmp_path, log)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    ref_metrics, got_metrics = read_metrics(reference.log_path), read_metrics(resumed.log_path)
    assert [m["step"] for m in got_metrics] == [1, 2, 3, 4, 5]
    for key in ("reward_mean", "loss", "grad_norm"):
        assert [m.get(key) for m in got_metrics] == [m.get(key) for m in ref_metrics], key
    assert sum(bool(m["trained_sequences"]) for m in got_metrics) >= 4  # it did train
    # The same completions were drawn after the resume as without the interruption...
    assert read_rollouts(log) == read_rollouts(reference.log_path)
    # ...and the first sampled after it came from a fresh base snapshot of the resumed weights
    # (the new trainer session's sync at step 2), not from what the deployment held before.
    # Off-policy, step 3 trains on the rollouts prefetched before the crash (restored from the
    # checkpoint), so the first sampling after the resume is step 4's.
    first_sampled = 3 if off_policy else 2
    sampled_from = got_metrics[first_sampled]["sampled_from"]
    assert sampled_from.rsplit("-", 1)[0].endswith("rl-sync-2")
    assert sampled_from != first_attempt[first_sampled]["sampled_from"]
    if off_policy:
        assert got_metrics[2]["sampled_from"] == first_attempt[2]["sampled_from"]
        assert got_metrics[2]["sampled_from"].rsplit("-", 1)[0].endswith("rl-sync-1")


def test_first_samples_after_resume_come_from_the_resumed_weights(tmp_path, monkeypatch):
    """The deployment serves exactly the checkpoint's weights when step 3 samples."""
    from training.recipes import rl_loop

    config = _config(tmp_path, dcp_save_interval=2, max_steps=3)
    main(config)
    log = Path(config.log_path)
    (log / "checkpoints.jsonl").write_text(json.dumps(checkpoint_rows(log)[0]) + "\n")
    seen = {}
    original = rl_loop.RolloutSampler.sample

    def spy(self, step, data_consumed, batch_size):
        if "weights" not in seen:
            engine = self.sampler.deployment.engine
            seen["step"] = step
            seen["weights"] = {k: v.clone() for k, v in engine.model.state_dict().items()}
        return original(self, step, data_consumed, batch_size)

    monkeypatch.setattr(rl_loop.RolloutSampler, "sample", spy)
    main(config)
    assert seen["step"] == 2
    # The step-2 train state's weights, loaded independently.
    from training.sdk import ServiceClient

    client = ServiceClient(str(tmp_path / "store"), device="cpu", mixed_precision="no") \
        .create_training_client(TEST_MODEL)
    client.load_state(checkpoint_rows(log)[0]["state_path"]).result()
    for name, tensor in client.model.state_dict().items():
        assert torch.equal(seen["weights"][name], tensor), name
    base = ServiceClient(str(tmp_path / "other"), device="cpu", mixed_precision="no") \
        .create_training_client(TEST_MODEL).model.state_dict()
    assert any(not torch.equal(seen["weights"][k], base[k]) for k in base)  # it did train


def test_kl_reference_and_gspo_loss(tmp_path):
    result = main(_config(tmp_path, max_steps=2, kl_beta=0.1, loss="gspo",
                          grad_accumulation_normalization="num_sequences"))
    trained = [m for m in read_metrics(result.log_path) if m["trained_sequences"]]
    assert trained, "no step trained"
    assert trained[0]["kl"] == pytest.approx(0.0, abs=1e-9)  # step 1: policy == reference
    if len(trained) > 1:
        assert trained[-1]["kl"] > 0


@pytest.mark.parametrize("loss", ["ppo", "dro"])
def test_tinker_builtin_losses_train(tmp_path, loss):
    result = main(_config(tmp_path, max_steps=2, loss=loss, off_policy=False))
    trained = [m for m in read_metrics(result.log_path) if m["trained_sequences"]]
    assert trained, "no step trained"
    for row in trained:
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
        assert "clip_fraction" not in row  # the recipe-side diagnostics are not computed
    with pytest.raises(ConfigError, match="no KL term"):
        main(_config(tmp_path, "kl", loss=loss, kl_beta=0.1))


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_inputs_are_refused_before_any_model_is_loaded(tmp_path):
    user = {"role": "user", "content": "2 + 2?"}
    ends_with_answer = _write(tmp_path / "a.jsonl", [
        {"messages": [user], "answer": "4"},
        {"messages": [user, {"role": "assistant", "content": "4"}], "answer": "4"}])
    with pytest.raises(DatasetError, match=r"a.jsonl:2: messages end with an assistant turn"):
        main(_config(tmp_path, dataset=ends_with_answer, reward_fn="numeric_answer"))
    no_answer = _write(tmp_path / "b.jsonl", [{"messages": [user], "answer": "4"},
                                              {"messages": [user], "solution": "4"}])
    with pytest.raises(DatasetError, match=r"b.jsonl:2: row has no 'answer' field.*solution"):
        main(_config(tmp_path, dataset=no_answer, reward_fn="numeric_answer"))
    with pytest.raises(RewardError, match="reward_fn='nope'"):
        main(_config(tmp_path, reward_fn="nope"))
    for field, value, match in [("loss", "reinforce", "loss='reinforce'"),
                                ("group_size", 1, "group_size must be >= 2"),
                                ("tis_cap", 0.5, "tis_cap=0.5 is below 1"),
                                ("max_completion_tokens", 600, "leaves no room")]:
        with pytest.raises(ConfigError, match=match):
            main(_config(tmp_path, **{field: value}))
    assert not (tmp_path / "store" / "jobs").exists()


def test_command_line_runs_the_recipe(tmp_path):
    log = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.rl_loop", f"log_path={log}", f"base_model={TEST_MODEL}",
         "max_steps=2", "batch_size=2", "group_size=2", "max_completion_tokens=4", "loss=dapo",
         f"infra.storage_root={tmp_path / 'store'}", "infra.num_threads=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rl_loop:" in proc.stdout and "loss dapo" in proc.stdout
    assert [r["step"] for r in checkpoint_rows(log)] == [2]
    assert len(read_rollouts(log)) == 2 * 2 * 2


def test_lora_policy_is_served_and_resumes_exactly(tmp_path):
    """lora_rank > 0: adapter snapshots are hot-loaded (merged onto the base) every step."""

    def adapter(log_path: str) -> dict[str, torch.Tensor]:
        row = checkpoint_rows(Path(log_path))[-1]
        entry = tmp_path / "store" / "jobs" / row["source_job_id"] / "samplers" / row[
            "sampler_path"]
        assert json.loads((entry / "meta.json").read_text())["snapshot_type"] == "INFERENCE_LORA"
        return load_file(entry / "adapter_model.safetensors")

    reference = main(_config(tmp_path, "reference", lora_rank=4, dcp_save_interval=2))
    rolled = _config(tmp_path, "rolled", lora_rank=4, dcp_save_interval=2)
    main(rolled)
    log = Path(rolled.log_path)
    (log / "checkpoints.jsonl").write_text(json.dumps(checkpoint_rows(log)[0]) + "\n")
    main(rolled)
    expected, got = adapter(reference.log_path), adapter(rolled.log_path)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert read_rollouts(log) == read_rollouts(reference.log_path)
    # The policy trained (its adapter moved) and its samples came from the synced adapters.
    assert any(float(v.abs().max()) > 0 for k, v in got.items() if "lora_B" in k)
    assert [m["step"] for m in read_metrics(log)] == [1, 2, 3, 4]
    # Trainer and deployment agree on the sampled tokens' logprobs: it served this adapter.
    ratios = [m["ratio_mean"] for m in read_metrics(log) if m.get("ratio_mean") is not None]
    assert ratios and all(abs(r - 1) < 1e-3 for r in ratios)


def test_the_engine_field_picks_the_rollout_engine_and_refuses_one_that_cannot_run(tmp_path):
    from training.recipes.rl_loop import validate
    from training.sdk import Engine, vllm_available
    from training.utils import ConfigError

    config = Config(log_path=str(tmp_path / "rl"), engine="transformers")
    validate(config)
    assert config.engine is Engine.transformers
    if not vllm_available():
        with pytest.raises(ConfigError, match="engine=vllm needs the vllm package"):
            validate(Config(log_path=str(tmp_path / "rl"), engine="vllm"))
