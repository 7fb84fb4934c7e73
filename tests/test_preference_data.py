"""Preference data: the three row formats, file:line errors, rendering, the bundled sample."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from training.sdk.models import load_tokenizer
from training.sdk.store import CheckpointStore
from training.utils.data import DatasetError
from training.utils.preference_data import (
    SAMPLE_PREFERENCES_PATH,
    PreferenceDataError,
    build_preference_examples,
    load_preference_pairs,
    pair_datums,
    render_pair,
    sequence_logprobs,
)

from .conftest import TEST_MODEL

REPO = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
GOOD = {"role": "assistant", "content": "4."}
BAD = {"role": "assistant", "content": "5."}


def _write(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(TEST_MODEL, CheckpointStore(None))


def test_the_three_formats_give_the_same_pair(tmp_path):
    path = _write(
        tmp_path / "prefs.jsonl",
        {"input": {"messages": PROMPT}, "preferred_output": [GOOD],
         "non_preferred_output": [BAD]},
        {"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]},
        {"chosen": [*PROMPT, GOOD], "rejected": [*PROMPT, BAD]},
        {"prompt": "2 + 2?", "chosen": "4.", "rejected": "5."},
    )
    pairs = load_preference_pairs(str(path))
    assert [p.format for p in pairs] == ["openai", "prompt_chosen_rejected", "chosen_rejected",
                                         "prompt_chosen_rejected"]
    for pair in pairs[:3]:
        assert (pair.prompt, pair.chosen, pair.rejected) == (PROMPT, [GOOD], [BAD])
    assert pairs[3].prompt == [{"role": "user", "content": "2 + 2?"}]
    assert pairs[3].chosen == [GOOD] and pairs[3].rejected == [BAD]
    assert [p.where for p in pairs] == [f"{path}:{i}" for i in range(1, 5)]


def test_implicit_prompt_is_the_shared_leading_messages(tmp_path):
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2 + 2?"}]
    path = _write(tmp_path / "p.jsonl", {
        "chosen": [*turn, GOOD, {"role": "user", "content": "thanks"}, GOOD],
        "rejected": [*turn, BAD]})
    (pair,) = load_preference_pairs(str(path))
    assert pair.prompt == turn
    assert pair.chosen == [GOOD, {"role": "user", "content": "thanks"}, GOOD]
    assert pair.rejected == [BAD]


@pytest.mark.parametrize("row,match", [
    ({"input": {"messages": PROMPT}, "preferred_output": [GOOD]},
     r"lacks non_preferred_output"),
    ({"input": {"messages": PROMPT}, "preferred_output": [{"role": "bot", "content": "4"}],
      "non_preferred_output": [BAD]}, r"preferred_output\[0\]\.role is 'bot'"),
    ({"input": {"messages": []}, "preferred_output": [GOOD], "non_preferred_output": [BAD]},
     r"input\.messages is a list of 0"),
    ({"input": "2 + 2?", "preferred_output": [GOOD], "non_preferred_output": [BAD]},
     r"input is str; expected an object"),
    ({"prompt": PROMPT, "chosen": [GOOD], "rejected": 5}, r"rejected is 5"),
    ({"prompt": "", "chosen": "4.", "rejected": "5."}, r"prompt is an empty string"),
    ({"prompt": PROMPT, "chosen": [{"role": "user", "content": "4."}], "rejected": [BAD]},
     r"chosen completion has no assistant message"),
    ({"chosen": "4.", "rejected": "5."}, r"chosen is a string but the row has no 'prompt'"),
    ({"chosen": [GOOD], "rejected": [BAD]}, r"share no leading messages"),
    ({"chosen": [*PROMPT, GOOD], "rejected": [*PROMPT, GOOD, BAD]}, r"chosen is a prefix"),
    ({"messages": [*PROMPT, GOOD]}, r"not a preference row \(its keys: messages\)"),
    ("[1, 2]", r"row is list"),
    ("{oops", r"invalid JSON"),
], ids=["openai-missing", "openai-role", "openai-empty", "openai-input", "explicit-type",
        "explicit-empty", "explicit-no-assistant", "implicit-strings", "implicit-no-prompt",
        "implicit-prefix", "sft-row", "not-object", "bad-json"])
def test_bad_rows_name_file_line_and_field(tmp_path, row, match):
    path = _write(tmp_path / "prefs.jsonl",
                  {"prompt": "ok?", "chosen": "yes", "rejected": "no"}, "", row)
    with pytest.raises(DatasetError, match=rf"prefs\.jsonl:3: .*{match}"):
        load_preference_pairs(str(path))


def test_empty_source_is_an_error(tmp_path):
    with pytest.raises(PreferenceDataError, match="has no rows"):
        load_preference_pairs(str(_write(tmp_path / "empty.jsonl", "")))


def test_rendering_weights_the_completion_only(tmp_path, tokenizer):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "2 + 2?"}]
    path = _write(tmp_path / "p.jsonl", {"input": {"messages": prompt},
                                         "preferred_output": [{"role": "assistant",
                                                               "content": "It is 4."}],
                                         "non_preferred_output": [BAD]})
    (pair,) = load_preference_pairs(str(path))
    c_tokens, c_weights, r_tokens, r_weights = render_pair(tokenizer, pair)
    trained = tokenizer.decode([t for t, w in zip(c_tokens, c_weights, strict=True) if w > 0])
    assert trained == "It is 4.<|im_end|>"  # not "hello", the prompt's assistant turn
    assert tokenizer.decode([t for t, w in zip(r_tokens, r_weights, strict=True)
                             if w > 0]) == "5.<|im_end|>"
    # Both sides start with the same prompt tokens, all with weight 0.
    first = c_weights.index(1.0)
    assert c_tokens[:first] == r_tokens[:first] and r_weights.index(1.0) == first
    assert tokenizer.decode(c_tokens[:first]).endswith("<|im_start|>assistant\n")


def test_build_examples_applies_the_long_row_policy_and_drops_identical_pairs(tmp_path,
                                                                              tokenizer):
    long_answer = {"role": "assistant", "content": "word " * 200}
    path = _write(tmp_path / "p.jsonl",
                  {"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]},
                  {"prompt": PROMPT, "chosen": [long_answer], "rejected": [BAD]},
                  {"prompt": PROMPT, "chosen": [GOOD], "rejected": [GOOD]})
    pairs = load_preference_pairs(str(path))
    examples, stats = build_preference_examples(pairs, tokenizer, 64, "drop")
    assert [e.index for e in examples] == [0] and examples[0].where.endswith("p.jsonl:1")
    assert (stats.kept, stats.dropped_too_long, stats.dropped_identical) == (1, 1, 1)
    examples, stats = build_preference_examples(pairs, tokenizer, 64, "truncate")
    assert [e.index for e in examples] == [0, 1] and stats.truncated == 1
    assert len(examples[1].chosen.tokens) == 64
    with pytest.raises(PreferenceDataError, match=r"p\.jsonl:2: a side renders to \d+ tokens"):
        build_preference_examples(pairs, tokenizer, 64, "error")


def test_sequence_logprobs_sum_the_completion_tokens(tmp_path, tokenizer):
    path = _write(tmp_path / "p.jsonl", {"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]},
                  {"prompt": "3 + 3?", "chosen": "6, obviously.", "rejected": "7."})
    examples, _ = build_preference_examples(load_preference_pairs(str(path)), tokenizer, 128)
    datums = pair_datums(examples)
    assert [d.model_input.to_ints() for d in datums] == [
        e.chosen.tokens[:-1] for e in examples] + [e.rejected.tokens[:-1] for e in examples]
    logprobs = [-torch.arange(1.0, d.model_input.length + 1) for d in datums]
    logps, num_tokens = sequence_logprobs(datums, logprobs)
    for i, (datum, lp) in enumerate(zip(datums, logprobs, strict=True)):
        weights = datum.loss_fn_inputs["weights"].to_torch()
        assert logps[i] == float(lp[weights > 0].sum()) and logps[i] < 0
        assert num_tokens[i] == int((weights > 0).sum()) > 0
    assert num_tokens[1] > num_tokens[3]  # "6, obviously." is longer than "7."


def test_bundled_sample_is_fresh_and_loads(tokenizer, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    script = importlib.import_module("make_preference_data")
    try:
        assert script.main(["--check"]) == 0, "run python scripts/make_preference_data.py"
    finally:
        sys.modules.pop("make_preference_data", None)
        sys.modules.pop("make_sample_data", None)
    pairs = load_preference_pairs(str(SAMPLE_PREFERENCES_PATH))
    assert len(pairs) == 400 and {p.format for p in pairs} == {"openai"}
    examples, stats = build_preference_examples(pairs, tokenizer, 512)
    assert stats.kept == 400, stats.summary()
