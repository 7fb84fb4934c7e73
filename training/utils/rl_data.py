"""RL data: prompt rows, sampled rollouts, their training datums and the rollouts log.

Prompt data is the OpenAI chat format without the answer: one JSON object per line with a
``messages`` list that ends where the model should answer, plus any ground-truth fields the
reward function reads (``answer``, ``pattern``, ...)::

    {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}

:func:`load_rl_prompts` validates and renders every row before any model is loaded;
:func:`rollout_datum` turns one sampled completion into the training datum of the RL losses;
:class:`RolloutLog` appends each step's rollouts to ``{log_path}/rollouts.jsonl``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.sdk.types import Datum, ModelInput, TensorData
from training.utils.data import DatasetError, load_chat_rows
from training.utils.metrics import truncate_steps_after

ROLLOUTS_FILE = "rollouts.jsonl"

SAMPLE_RL_PROMPTS_PATH: Path = Path(__file__).resolve().parent.parent / "data" / \
    "sample_rl_prompts.jsonl"
"""Bundled toy task (``scripts/make_rl_prompts.py``): 120 prompts asking for words that start
with the letter s, each with a ``pattern`` for the ``regex_coverage`` reward."""


@dataclass
class RLPrompt:
    """One validated prompt row."""

    row: dict[str, Any]
    """``messages`` plus the row's other fields: what the reward function gets."""
    where: str
    """Location for messages: ``prompts.jsonl:7``."""
    prompt_tokens: list[int]
    """The rendered prompt (chat template, assistant turn opened)."""

    @property
    def messages(self) -> list[dict]:
        return self.row["messages"]


@dataclass
class RLPromptStats:
    rows: int = 0
    dropped_too_long: int = 0

    def summary(self) -> str:
        return (f"{self.rows} prompts" + (f", {self.dropped_too_long} dropped as longer than "
                                          f"max_seq_len - max_completion_tokens"
                                          if self.dropped_too_long else ""))


def load_rl_prompts(source: str, tokenizer: Any, *, max_prompt_tokens: int,
                    required_fields: Sequence[str] = (), split: str = "train",
                    ) -> tuple[list[RLPrompt], RLPromptStats]:
    """Read, validate and render the prompt rows of ``source`` (any source
    :func:`training.utils.data.load_chat_rows` reads).

    Rows whose prompt is longer than ``max_prompt_tokens`` are dropped (counted in the stats).

    Raises:
        DatasetError: a row is invalid, ends with an assistant turn (the answer belongs in a
            field such as ``answer``), lacks a field in ``required_fields``, or no row is left;
            the message names ``file:line``.
    """
    prompts: list[RLPrompt] = []
    stats = RLPromptStats()
    for chat in load_chat_rows(source, split=split):
        where = chat.where
        if chat.messages[-1].get("role") == "assistant":
            raise DatasetError(f"{where}: messages end with an assistant turn; an RL prompt ends "
                               f"where the model answers. Drop that turn (put a reference "
                               f"answer in a field such as 'answer' for the reward function)")
        missing = [name for name in required_fields if name not in chat.fields]
        if missing:
            raise DatasetError(f"{where}: row has no {', '.join(map(repr, missing))} field, which "
                               f"the reward function reads (the row's fields: "
                               f"{', '.join(chat.fields) or 'none'}); add it or choose another "
                               f"reward_fn")
        tokens = list(tokenizer.apply_chat_template(
            chat.messages, tools=chat.fields.get("tools"), add_generation_prompt=True,
            tokenize=True, return_dict=False))
        stats.rows += 1
        if len(tokens) > max_prompt_tokens:
            stats.dropped_too_long += 1
            continue
        prompts.append(RLPrompt(row={"messages": chat.messages, **chat.fields}, where=where,
                                prompt_tokens=tokens))
    if not prompts:
        raise DatasetError(f"{source}: every one of its {stats.rows} prompts is longer than "
                           f"{max_prompt_tokens} tokens (max_seq_len - max_completion_tokens); "
                           f"raise max_seq_len or shorten the prompts")
    return prompts, stats


def sampling_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of the prompt at data ``position`` in 0-based ``step``: a function of
    nothing else, so a resumed run draws exactly the completions the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, step, position]).generate_state(1)[0])


@dataclass
class Rollout:
    """One sampled completion of one prompt, scored."""

    prompt_index: int
    """Index of the prompt in the loaded prompt list."""
    position: int
    """Data position of the prompt (its draw number in the run's prompt order)."""
    prompt_tokens: list[int]
    completion_tokens: list[int]
    """Sampled token ids, the stop token included."""
    sampling_logprobs: list[float]
    """Per completion token, log mu from the inference engine (nats)."""
    text: str
    """The completion decoded without special tokens (what the reward saw)."""
    finish_reason: str
    """``stop`` or ``length``."""
    reward: float
    advantage: float = 0.0
    trained: bool = False
    """False when its group was dropped for zero reward variance (or it has no tokens)."""


@dataclass
class RolloutBatch:
    """Every rollout of one step, grouped by prompt (``group_size`` consecutive rollouts)."""

    rollouts: list[Rollout]
    group_size: int
    sample_seconds: float
    """Wall time of sampling and scoring, in seconds."""
    synced_snapshot: str | None = None
    """Identity of the weights the deployment served while sampling."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rewards(self) -> torch.Tensor:
        """``[groups, group_size]`` float64 rewards."""
        return torch.tensor([r.reward for r in self.rollouts],
                            dtype=torch.float64).reshape(-1, self.group_size)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(r.completion_tokens) for r in self.rollouts)


def rollout_datum(rollout: Rollout) -> Datum:
    """The next-token datum of one rollout: ``model_input = tokens[:-1]``,
    ``target_tokens = tokens[1:]``, ``weights`` 1 on the completion's targets and 0 on the
    prompt's, and (aligned with the targets, 0 on the prompt) ``sampling_logprobs`` and the
    sequence's ``advantages``."""
    full = [*rollout.prompt_tokens, *rollout.completion_tokens]
    prompt_len, length = len(rollout.prompt_tokens), len(full) - 1
    weights = [0.0] * (prompt_len - 1) + [1.0] * len(rollout.completion_tokens)
    sampling = [0.0] * (prompt_len - 1) + [float(x) for x in rollout.sampling_logprobs]
    if len(rollout.sampling_logprobs) != len(rollout.completion_tokens):
        raise ValueError(f"rollout of prompt {rollout.prompt_index}: "
                         f"{len(rollout.sampling_logprobs)} sampling logprobs for "
                         f"{len(rollout.completion_tokens)} completion tokens")

    def tensor(values: list[float], dtype: str = "float32") -> TensorData:
        return TensorData(data=values, dtype=dtype, shape=[length])

    return Datum(model_input=ModelInput.from_ints(full[:-1]), loss_fn_inputs={
        "target_tokens": tensor(full[1:], "int64"), "weights": tensor(weights),
        "sampling_logprobs": tensor(sampling),
        "advantages": tensor([rollout.advantage if w else 0.0 for w in weights])})


def completion_mask(datum: Datum) -> torch.Tensor:
    """Bool ``[positions]``: the positions of ``datum`` that predict completion tokens."""
    return datum.loss_fn_inputs["weights"].to_torch().reshape(-1) > 0


class RolloutLog:
    """Appends each step's rollouts to ``{log_path}/rollouts.jsonl`` (one row per completion:
    ``step``, ``position``, ``prompt``, ``completion``, ``reward``, ``advantage``, ``trained``,
    ``finish_reason``, ``num_tokens``).

    On resume from ``start_step`` the rows of later steps (written after the last checkpoint by
    the interrupted run) are dropped first, so no step appears twice.
    """

    def __init__(self, log_path: str | os.PathLike[str], start_step: int = 0) -> None:
        self.path = Path(log_path) / ROLLOUTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_steps_after(self.path, start_step)

    def append(self, step: int, batch: RolloutBatch, prompts: Sequence[RLPrompt]) -> None:
        """Write the rollouts of 1-based ``step``."""
        with open(self.path, "a", encoding="utf-8") as f:
            for r in batch.rollouts:
                messages = prompts[r.prompt_index].messages
                f.write(json.dumps({
                    "step": step, "position": r.position,
                    "prompt": messages[-1].get("content"), "completion": r.text,
                    "reward": r.reward, "advantage": r.advantage, "trained": r.trained,
                    "finish_reason": r.finish_reason,
                    "num_tokens": len(r.completion_tokens)}) + "\n")


def read_rollouts(log_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of ``{log_path}/rollouts.jsonl``."""
    path = Path(log_path) / ROLLOUTS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
