"""tinker-cookbook 0.6.1's own supervised loop, unchanged, against the trainer server.

The cookbook finds the tokenizer by model name (a local directory loads offline), renders the
chats with its qwen3 renderer and trains a LoRA adapter over the wire; killed after a
checkpoint, it resumes from its checkpoints.jsonl like it does against Tinker, and what it saved
promotes with scripts/promote_checkpoint.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from .conftest import TrainerServerThread

pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is installed by "
                                              "scripts/setup.sh (--no-deps, see README)")

from tinker_cookbook.renderers import TrainOnWhat  # noqa: E402
from tinker_cookbook.supervised import train  # noqa: E402
from tinker_cookbook.supervised.data import FromConversationFileBuilder  # noqa: E402
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHATS = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                       {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}
         for a in range(3, 11) for b in range(2, 6)]


def _config(model_dir: str, data: Path, log_path: Path, url: str) -> train.Config:
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model_dir, renderer_name="qwen3", max_length=128,
        batch_size=4, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    return train.Config(
        log_path=str(log_path), model_name=model_dir, recipe_name="homefire_test",
        renderer_name="qwen3",
        dataset_builder=FromConversationFileBuilder(common_config=common, file_path=str(data)),
        learning_rate=1e-3, lr_schedule="linear", num_epochs=1, lora_rank=4, base_url=url,
        save_every=3, eval_every=0, max_steps=8, ttl_seconds=None)


def _final_adapter(store_root: str, log_path: Path) -> dict[str, torch.Tensor]:
    rows = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text()
            .splitlines()]
    run, _, name = rows[-1]["sampler_path"].removeprefix("tinker://").split("/")
    return load_file(str(Path(store_root) / "jobs" / run / "samplers" / name
                         / "adapter_model.safetensors"))


def test_cookbook_supervised_loop_trains_resumes_and_promotes(store_root, tiny_model_dir,
                                                             tmp_path, monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    model_dir = str(tiny_model_dir)
    server = TrainerServerThread(store_root, base_models=[model_dir])
    try:
        log = tmp_path / "run"
        asyncio.run(train.main(_config(model_dir, data, log, server.url)))
        rows = [json.loads(line) for line in (log / "checkpoints.jsonl").read_text()
                .splitlines()]
        assert [r["name"] for r in rows] == ["000003", "000006", "final"]
        first_final = _final_adapter(store_root, log)
        # As if the run had been killed right after its step-3 checkpoint: rerun it.
        (log / "checkpoints.jsonl").write_text(json.dumps(rows[0]) + "\n")
        asyncio.run(train.main(_config(model_dir, data, log, server.url)))
        resumed_rows = [json.loads(line) for line in (log / "checkpoints.jsonl").read_text()
                        .splitlines()]
        # The cookbook resumes at the saved batch (and saves it again once it re-ran it).
        assert resumed_rows[0] == rows[0] and resumed_rows[-1]["name"] == "final"
        assert [r["batch"] for r in resumed_rows[1:-1]] == [3, 6]
        assert resumed_rows[-1]["state_path"] != rows[-1]["state_path"]  # a new run resumed
        metrics = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
        first_resumed = metrics[8]  # after the 8 steps of the first attempt
        assert first_resumed["learning_rate"] == pytest.approx(metrics[3]["learning_rate"])
        resumed = _final_adapter(store_root, log)
        assert resumed.keys() == first_final.keys()
        # Not bitwise the first attempt's: the cookbook re-trains the batches it had submitted
        # after the saved step (see docs/server.md); exact resume over the wire is tested in
        # test_trainer_server.py.
        assert any(not torch.equal(first_final[k], resumed[k]) for k in resumed)
    finally:
        server.stop()
    promoted = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "promote_checkpoint.py"), "--checkpoints-jsonl",
         str(log / "checkpoints.jsonl"), "--storage-root", store_root, "--output-model-id",
         "cookbook-sft", "--merge"], capture_output=True, text=True, timeout=120)
    assert promoted.returncode == 0, promoted.stderr
    from transformers import AutoModelForCausalLM

    path = promoted.stdout.split("path:")[1].split()[0]
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 64


def test_docs_server_examples_run(store_root, tmp_path, monkeypatch, capsys):
    """docs/server.md's Python blocks and its promotion command, against a test server (the
    docs' port and store are swapped for the test's)."""
    import re
    import shlex

    doc = (REPO / "docs" / "server.md").read_text()
    python_blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    bash_blocks = re.findall(r"```bash\n(.*?)```", doc, flags=re.S)
    assert len(python_blocks) == 3 and len(bash_blocks) == 2
    server = TrainerServerThread(store_root, base_models=["homefire/tiny-qwen3"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINKER_BASE_URL", server.url)
    monkeypatch.setenv("TINKER_API_KEY", "tml-local")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    try:
        for block in python_blocks:
            code = block.replace("http://127.0.0.1:8000", server.url)
            exec(compile(code, "docs/server.md", "exec"), {"__name__": "__docs__"})
    finally:
        server.stop()
    assert "tinker://" in capsys.readouterr().out
    assert (tmp_path / "runs" / "cookbook-sl" / "checkpoints.jsonl").exists()
    command = bash_blocks[1].replace("\\\n", " ").replace("~/homefire-store", store_root)
    args = shlex.split(command)
    assert args[0] == ".venv/bin/python"
    promoted = subprocess.run([sys.executable, str(REPO / args[1]), *args[2:]],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert promoted.returncode == 0, promoted.stderr
    assert "cookbook-sl" in promoted.stdout


# ---------------------------------------------------------------- the cookbook's RL loop
import chz  # noqa: E402
from tinker_cookbook import renderers  # noqa: E402
from tinker_cookbook.rl import train as rl_train  # noqa: E402
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder  # noqa: E402
from tinker_cookbook.rl.types import RLDataset, RLDatasetBuilder  # noqa: E402


class _SWordEnv(ProblemEnv):
    """Reward: the answer has a word starting with 's' (the bundled RL demo's task)."""

    def get_question(self) -> str:
        return "Say a word that starts with the letter s."

    def check_answer(self, sample_str: str) -> bool:
        return any(w.lower().startswith("s") for w in sample_str.split())

    def check_format(self, sample_str: str) -> bool:
        return True

    def get_reference_answer(self) -> str:
        return "sun"


class _SWordDataset(RLDataset):
    def __init__(self, renderer: renderers.Renderer, batches: int) -> None:
        self.renderer, self.batches = renderer, batches

    def get_batch(self, index: int):
        return [ProblemGroupBuilder(lambda: _SWordEnv(self.renderer), num_envs=4)
                for _ in range(2)]

    def __len__(self) -> int:
        return self.batches


@chz.chz
class _SWordBuilder(RLDatasetBuilder):
    model_name: str
    batches: int = 3

    async def __call__(self):
        from tinker_cookbook.tokenizer_utils import get_tokenizer

        renderer = renderers.get_renderer("qwen3", get_tokenizer(self.model_name))
        return _SWordDataset(renderer, self.batches), None


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_cookbook_rl_loop_samples_and_trains_over_the_wire(store_root, tiny_model_dir,
                                                           tmp_path, monkeypatch, loss_fn):
    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = str(tiny_model_dir)
    server = TrainerServerThread(store_root, base_models=[model_dir])
    log = tmp_path / "rl"
    try:
        config = rl_train.Config(
            model_name=model_dir, recipe_name="homefire_rl", renderer_name="qwen3",
            log_path=str(log), dataset_builder=_SWordBuilder(model_name=model_dir),
            learning_rate=1e-3, max_tokens=8, eval_every=0, save_every=2, lora_rank=4,
            loss_fn=loss_fn, base_url=server.url, ttl_seconds=None)
        asyncio.run(rl_train.main(config))
    finally:
        server.stop()
    metrics = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "env/all/reward/total" in m]
    assert len(trained) == 3
    rows = [json.loads(line) for line in (log / "checkpoints.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["sampler_path"].startswith("tinker://")


# ---------------------------------------------------------------- the cookbook's DPO
def test_cookbook_dpo_uses_forward_backward_custom_and_compute_logprobs(
        store_root, tiny_model_dir, tmp_path, monkeypatch):
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl

    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"comparison": {
        "prompt_conversation": [{"role": "user", "content": f"What is {a} + 2?"}],
        "completion_A": [{"role": "assistant", "content": f"{a + 2}."}],
        "completion_B": [{"role": "assistant", "content": f"{a + 3}."}]}, "label": "A"}) + "\n"
        for a in range(16)))
    model_dir = str(tiny_model_dir)
    common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=model_dir,
                                            renderer_name="qwen3", max_length=128, batch_size=4)
    server = TrainerServerThread(store_root, base_models=[model_dir])
    log = tmp_path / "dpo"
    try:
        config = train_dpo.Config(
            log_path=str(log), model_name=model_dir, renderer_name="qwen3",
            recipe_name="homefire_dpo",
            dataset_builder=DPODatasetBuilderFromComparisons(
                common_config=common,
                comparison_builder=ComparisonBuilderFromJsonl(train_path=str(pairs))),
            learning_rate=1e-4, lora_rank=4, base_url=server.url, save_every=0,
            eval_every=0, max_steps=3, ttl_seconds=None)
        train_dpo.main(config)
    finally:
        server.stop()
    metrics = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    # The reference logprobs (compute_logprobs on a sampling client of the initial weights)
    # equal the policy's at step 0: DPO's loss is exactly log 2 there.
    assert metrics[0]["dpo_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert all(np.isfinite(m["dpo_loss"]) for m in metrics)
