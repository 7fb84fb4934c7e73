"""Data-parallel training under torchrun (2 CPU ranks on gloo, one thread each).

Each test launches real ``torchrun --standalone --nproc_per_node=2 -m recipes...`` processes,
so the launch command documented in the README is the one tested. fp32 (mixed_precision=no)
keeps one rank and two ranks within float-summation-order noise of each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TEST_MODEL, checkpoint_rows, final_sampler_weights
from training.sdk import distributed
from training.sdk.store import CheckpointStore
from training.utils.metrics import read_metrics
from training.utils.rl_data import SAMPLE_RL_PROMPTS_PATH

REPO = Path(__file__).resolve().parent.parent
STEPS = 6


def _write_chats(path: Path, n: int = 48) -> None:
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n"
        for i in range(n)))


def _launch(base: Path, log_name: str, ranks: int, recipe: str = "sft_loop",
            extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    args = [f"log_path={base / log_name}", f"base_model={TEST_MODEL}",
            f"dataset={base / 'chats.jsonl'}", "batch_size=4", f"max_steps={STEPS}",
            "dcp_save_interval=2", "learning_rate=1e-3", "seed=3",
            f"infra.storage_root={base / 'store'}", "infra.num_threads=1",
            "infra.mixed_precision=no"]
    overridden = {arg.split("=", 1)[0] for arg in extra}
    args = [arg for arg in args if arg.split("=", 1)[0] not in overridden] + list(extra)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable])
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("HOMEFIRE_FAULT_POINT", "HOMEFIRE_FAULT_RANK")}
    full_env.update(env or {}, PYTHONUNBUFFERED="1")
    return subprocess.run([*launcher, "-m", f"recipes.{recipe}", *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run on 1 process and one on 2 ranks, shared by the tests."""
    base = tmp_path_factory.mktemp("dist")
    _write_chats(base / "chats.jsonl")
    _ok(_launch(base, "one", ranks=1))
    _ok(_launch(base, "two", ranks=2))
    return base


def test_two_ranks_train_like_one_process(runs):
    one, two = read_metrics(runs / "one"), read_metrics(runs / "two")
    # Rank 0 alone writes metrics and rows: one of each per step/save, no duplicates.
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    assert [r["step"] for r in checkpoint_rows(runs / "two")] == [2, 4, 6]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    _assert_close(final_sampler_weights(runs, runs / "one"), final_sampler_weights(runs, runs / "two"))
    # The train state is sharded: each rank wrote its own file.
    row = checkpoint_rows(runs / "two")[1]
    state_dir = Path(CheckpointStore(str(runs / "store")).state_dir(row["source_job_id"],
                                                                     row["name"]))
    assert sorted(p.name for p in state_dir.glob("*.distcp")) == ["__0_0.distcp",
                                                                   "__1_0.distcp"]


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_resume_at_another_world_size(runs, first, second):
    """Killed after step 3 (last checkpoint: step 2) at one world size, resumed at the other:
    same data position, and the end matches an uninterrupted run."""
    log = f"resize-{first}-{second}"
    # Synchronous saves, so the step-2 checkpoint is surely recorded when step 3 ends (the
    # async default may still be writing it: then the run would restart from scratch).
    killed = _launch(runs, log, ranks=first, extra=("infra.async_checkpoint=false",),
                     env={"HOMEFIRE_FAULT_POINT": "step:3"})
    assert killed.returncode != 0
    assert [r["step"] for r in checkpoint_rows(runs / log)] == [2]
    output = _ok(_launch(runs, log, ranks=second))
    assert "resuming from step-2 (step 2, 8 examples consumed)" in output
    assert [m["step"] for m in read_metrics(runs / log)] == list(range(1, STEPS + 1))
    _assert_close(final_sampler_weights(runs, runs / "one"), final_sampler_weights(runs, runs / log))


def test_lost_rank_stops_the_run_and_the_rerun_resumes(runs):
    """Rank 1 is SIGKILLed after step 3: the launch fails naming it, nothing after step 2 is
    recorded, and rerunning the same command resumes and ends bitwise equal to an uninterrupted
    2-rank run."""
    lost = _launch(runs, "lost", ranks=2, extra=("infra.async_checkpoint=false",),
                   env={"HOMEFIRE_FAULT_POINT": "step:3", "HOMEFIRE_FAULT_RANK": "1"})
    output = lost.stdout + lost.stderr
    assert lost.returncode != 0
    assert "rank      : 1" in output and "SIGKILL" in output, output[-3000:]
    # Rank 0 says why it stopped and how to go on: its collective failed (RankLostError) or
    # torchrun's SIGTERM came first.
    assert ("lost contact with another rank" in output
            or "rank 0 was stopped by SIGTERM" in output), output[-3000:]
    assert "Rerun the same" in output
    assert [r["step"] for r in checkpoint_rows(runs / "lost")] == [2]
    rerun = _ok(_launch(runs, "lost", ranks=2, extra=("infra.async_checkpoint=false",)))
    assert "resuming from step-2" in rerun
    expected, got = final_sampler_weights(runs, runs / "two"), final_sampler_weights(runs, runs / "lost")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_dpo_on_two_ranks_matches_one_process(runs, lora_rank):
    """With LoRA, the reference is the policy's own (sharded) model with its adapter off."""
    prefs = runs / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": f"Say {i}."}]},
        "preferred_output": [{"role": "assistant", "content": f"{i}."}],
        "non_preferred_output": [{"role": "assistant", "content": f"No, {i + 1}."}]}) + "\n"
        for i in range(32)))
    extra = (f"dataset={prefs}", "max_steps=4", f"lora_rank={lora_rank}")
    one = _launch(runs, f"dpo-one-{lora_rank}", ranks=1, recipe="dpo_loop", extra=extra)
    two = _launch(runs, f"dpo-two-{lora_rank}", ranks=2, recipe="dpo_loop", extra=extra)
    _ok(one), _ok(two)
    for a, b in zip(read_metrics(runs / f"dpo-one-{lora_rank}"),
                    read_metrics(runs / f"dpo-two-{lora_rank}"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["preference_accuracy"] == a["preference_accuracy"]


def test_lora_on_two_ranks_trains_like_one_process(runs):
    """LoRA under FSDP2: frozen base and adapters sharded alike; the adapter snapshot is
    gathered onto rank 0 and is the same PEFT directory one process writes."""
    from safetensors.torch import load_file

    extra = ("lora_rank=4", "max_steps=4")
    _ok(_launch(runs, "lora-one", ranks=1, extra=extra))
    _ok(_launch(runs, "lora-two", ranks=2, extra=extra))
    for a, b in zip(read_metrics(runs / "lora-one"), read_metrics(runs / "lora-two"),
                    strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    store = CheckpointStore(str(runs / "store"))
    adapters = []
    for log in ("lora-one", "lora-two"):
        final = checkpoint_rows(runs / log)[-1]
        directory = Path(store.sampler_dir(final["source_job_id"], final["sampler_path"]))
        assert (directory / "adapter_config.json").exists()
        adapters.append(load_file(directory / "adapter_model.safetensors"))
    assert adapters[0] and all("lora_" in k for k in adapters[0])
    _assert_close(*adapters)


def test_lora_rl_on_two_ranks_starts_like_one_process(runs):
    """Each rank hotloads the adapter snapshots rank 0 writes into its own deployment."""
    extra = (f"dataset={SAMPLE_RL_PROMPTS_PATH}", "max_steps=2", "lora_rank=4")
    _ok(_launch(runs, "rl-lora-one", ranks=1, recipe="rl_loop", extra=extra))
    _ok(_launch(runs, "rl-lora-two", ranks=2, recipe="rl_loop", extra=extra))
    one, two = read_metrics(runs / "rl-lora-one"), read_metrics(runs / "rl-lora-two")
    assert two[0]["reward_mean"] == one[0]["reward_mean"]
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    # The second step samples from the adapter trained at step 1, hotloaded on both ranks.
    assert two[1]["reward_mean"] == pytest.approx(one[1]["reward_mean"], rel=1e-4)


def test_two_nodes_with_c10d_rendezvous_train_like_one_standalone_launch(runs):
    """The README's multi-node command, as two 'nodes' of one process each on loopback."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [f"log_path={runs / 'nodes'}", f"base_model={TEST_MODEL}",
            f"dataset={runs / 'chats.jsonl'}", "batch_size=4", f"max_steps={STEPS}",
            "dcp_save_interval=2", "learning_rate=1e-3", "seed=3",
            f"infra.storage_root={runs / 'store'}", "infra.num_threads=1",
            "infra.mixed_precision=no"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOMEFIRE_FAULT_POINT", "HOMEFIRE_FAULT_RANK")}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
         "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
         "--rdzv_id=homefire-test", "-m", "recipes.sft_loop", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    two, nodes_run = read_metrics(runs / "two"), read_metrics(runs / "nodes")
    assert [m["loss"] for m in nodes_run] == pytest.approx([m["loss"] for m in two], rel=1e-6)
    assert [r["step"] for r in checkpoint_rows(runs / "nodes")] == [2, 4, 6]


def test_shard_range_covers_every_item_once():
    for count in range(0, 9):
        for size in (1, 2, 3):
            spans = [distributed.shard_range(count, distributed.World(r, size))
                     for r in range(size)]
            assert [i for a, b in spans for i in range(a, b)] == list(range(count))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_rl_on_two_ranks_starts_like_one_process(runs):
    """Both ranks sample the same rollouts (seeded per prompt) from their own deployment and
    train on their halves: the first step's rewards and gradient match one process."""
    extra = (f"dataset={SAMPLE_RL_PROMPTS_PATH}", "max_steps=2")
    _ok(_launch(runs, "rl-one", ranks=1, recipe="rl_loop", extra=extra))
    _ok(_launch(runs, "rl-two", ranks=2, recipe="rl_loop", extra=extra))
    one, two = read_metrics(runs / "rl-one")[0], read_metrics(runs / "rl-two")[0]
    assert two["reward_mean"] == one["reward_mean"]
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert [r["step"] for r in checkpoint_rows(runs / "rl-two")] == [2]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nccl)")
def test_two_gpu_ranks_with_nccl_train_like_one(runs):
    """The nccl path: FSDP2 with bf16 parameter gathering, one GPU per rank."""
    extra = ("infra.device=cuda", "infra.mixed_precision=bf16")
    _ok(_launch(runs, "gpu-one", ranks=1, extra=extra))
    _ok(_launch(runs, "gpu-two", ranks=2, extra=extra))
    one, two = read_metrics(runs / "gpu-one"), read_metrics(runs / "gpu-two")
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)
