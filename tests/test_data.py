"""Tests of training.utils.data: loading, validation, rendering, long rows and data order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from training.utils.data import (
    ChatRow,
    ChatTemplateError,
    DatasetError,
    DataStats,
    SFTExample,
    SupervisedDataset,
    build_sft_examples,
    dataset_fingerprint,
    example_to_datum,
    load_chat_rows,
    render_chat,
)

USER = {"role": "user", "content": "What is the capital of France?"}
ANSWER = "The capital of France is Paris."
ASSISTANT = {"role": "assistant", "content": ANSWER}
WEATHER_CALL = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The built-in test model's tokenizer: ChatML template, ``<|im_end|>`` end of turn."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, lines: list) -> Path:
    """Write dicts as JSON lines; strings are written verbatim (blank or malformed lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def weighted_runs(tokenizer, tokens: list[int], weights: list[float]) -> list[tuple[str, float]]:
    """Decoded maximal runs of consecutive tokens with the same positive weight."""
    runs: list[tuple[list[int], float]] = []
    previous = 0.0
    for token, weight in zip(tokens, weights, strict=True):
        if weight > 0 and weight == previous:
            runs[-1][0].append(token)
        elif weight > 0:
            runs.append(([token], weight))
        previous = weight
    return [(tokenizer.decode(ids), weight) for ids, weight in runs]


def with_template(tokenizer, chat_template: str | None):
    """A copy of ``tokenizer`` with another chat template."""
    copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    copy.chat_template = chat_template
    return copy


# ChatML without end-of-turn tokens.
PLAIN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_row(messages: list[dict], line: int = 1, **fields) -> ChatRow:
    return ChatRow(messages=messages, source="rows.jsonl", line=line, fields=fields)


# ---------------------------------------------------------------------------------------------
# render_chat


def test_only_assistant_content_and_end_of_turn_are_weighted(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, USER, ASSISTANT]
    tokens, weights = render_chat(tokenizer, messages)

    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(tokens) == full
    assert weighted_runs(tokenizer, tokens, weights) == [(ANSWER + "<|im_end|>", 1.0)]
    assert set(weights) == {0.0, 1.0}
    # Everything before the answer, generation prompt included, is context; after it comes only
    # the newline that separates turns, which the model never generates.
    first = weights.index(1.0)
    last = len(weights) - weights[::-1].index(1.0)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(tokens[:first]) == prompt
    assert tokenizer.decode(tokens[last:]) == "\n"


def test_multi_turn_weights_every_assistant_turn(tokenizer):
    messages = [USER, ASSISTANT, {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome."}]
    tokens, weights = render_chat(tokenizer, messages)
    assert weighted_runs(tokenizer, tokens, weights) == [(ANSWER + "<|im_end|>", 1.0),
                                                         ("Rome.<|im_end|>", 1.0)]


def test_message_weight_overrides_the_default_both_ways(tokenizer):
    messages = [{**USER, "weight": 1}, {**ASSISTANT, "weight": 0},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome.", "weight": 0.5}]
    tokens, weights = render_chat(tokenizer, messages)
    # A non-assistant message is trained on whole, role header included.
    assert weighted_runs(tokenizer, tokens, weights) == [
        ("<|im_start|>user\n" + USER["content"] + "<|im_end|>", 1.0), ("Rome.<|im_end|>", 0.5)]


def test_assistant_first_conversation_excludes_its_header(tokenizer):
    tokens, weights = render_chat(tokenizer, [{"role": "assistant", "content": "Hello there."}])
    assert weighted_runs(tokenizer, tokens, weights) == [("Hello there.<|im_end|>", 1.0)]


def test_tool_calls_and_results(tokenizer):
    messages = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "22 C"},
        {"role": "assistant", "content": "Sunny, 22 C."},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    tokens, weights = render_chat(tokenizer, messages, tools=tools)

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert weighted_runs(tokenizer, tokens, weights) == [(call + "<|im_end|>", 1.0),
                                                         ("Sunny, 22 C.<|im_end|>", 1.0)]
    text = tokenizer.decode(tokens)
    assert '"name": "get_weather", "parameters"' in text  # tools reached the template
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_template_sees_normalized_messages_without_weights(tokenizer, monkeypatch):
    seen: list[list[dict]] = []
    original = tokenizer.apply_chat_template

    def spy(messages, *args, **kwargs):
        seen.append(messages)
        return original(messages, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", spy)
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    render_chat(tokenizer, [{"role": "user", "content": parts, "weight": 0},
                            {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL],
                             "weight": 1}])

    assert seen
    for messages in seen:
        assert all("weight" not in message for message in messages)
        assert messages[0]["content"] == "What is the capital of France?"
    last = seen[0][-1]
    assert last["content"] == ""
    assert last["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_content_parts_render_like_the_joined_string(tokenizer):
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    assert (render_chat(tokenizer, [{"role": "user", "content": parts}, ASSISTANT])
            == render_chat(tokenizer, [USER, ASSISTANT]))


def test_tokens_merging_across_message_boundaries(tokenizer):
    # No end-of-turn token, and a generation prompt ending in a space: the answer's first word
    # takes the header's space (" The") and its last character the turn's newline (".\n").
    merging = with_template(tokenizer, (
        "{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"))
    tokens, weights = render_chat(merging, [USER, ASSISTANT])
    pieces = [merging.decode(t) for t in tokens]
    assert " The" in pieces and pieces[-1] == ".\n"
    # A token belongs to the message its last character is in.
    assert weighted_runs(merging, tokens, weights) == [(" " + ANSWER + "\n", 1.0)]


def test_template_without_generation_prompt_trains_the_assistant_header(tokenizer):
    no_prompt = with_template(tokenizer, PLAIN_TEMPLATE.split("{% if")[0])
    tokens, weights = render_chat(no_prompt, [USER, ASSISTANT])
    assert weighted_runs(no_prompt, tokens, weights) == [
        ("<|im_start|>assistant\n" + ANSWER + "\n", 1.0)]


def test_template_that_rewrites_history_falls_back_to_content_search(tokenizer, tmp_path):
    # Like Qwen3's own template: <think> blocks are kept only on the last assistant turn, so
    # rendered prefixes are not prefixes of the whole rendering.
    rewriting = with_template(tokenizer, (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    messages = [USER, {"role": "assistant", "content": "<think>hm</think>Paris."},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "<think>yes</think>Yes."}]
    tokens, weights = render_chat(rewriting, messages)
    # Each assistant turn trains as the template shows it in context: the earlier one without
    # its (stripped) thinking, the last one with it.
    assert weighted_runs(rewriting, tokens, weights) == [
        ("Paris.<|im_end|>", 1.0), ("<think>yes</think>Yes.<|im_end|>", 1.0)]

    rows = load_chat_rows(str(write_jsonl(tmp_path / "think.jsonl", [{"messages": messages}])))
    examples, _ = build_sft_examples(rows, rewriting, max_seq_len=512)
    assert examples[0].tokens == tokens

    weighted_user = [{**USER, "weight": 1}, *messages[1:]]
    with pytest.raises(ChatTemplateError, match=r"messages\[0\] is a weighted user turn"):
        render_chat(rewriting, weighted_user)


def test_tokenizer_without_chat_template_is_refused(tokenizer):
    bare = with_template(tokenizer, None)
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        render_chat(bare, [USER, ASSISTANT])


# ---------------------------------------------------------------------------------------------
# load_chat_rows


def test_jsonl_rows_keep_line_numbers_and_extra_fields(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"messages": [USER, ASSISTANT], "answer": "Paris"},
        "",
        {"messages": [USER], "tools": '[{"type": "function", "function": {"name": "f"}}]'},
    ])
    rows = load_chat_rows(str(path))
    assert [(row.line, row.where) for row in rows] == [(1, f"{path}:1"), (3, f"{path}:3")]
    assert rows[0].messages == [USER, ASSISTANT]
    assert rows[0].fields == {"answer": "Paris"}
    # A JSON-string tools field (common in hub exports) is parsed for the template.
    assert rows[1].fields["tools"] == [{"type": "function", "function": {"name": "f"}}]


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"messages": [USER, ASSISTANT]}, {"messages": [USER]}]))
    rows = load_chat_rows(str(path))
    assert [row.where for row in rows] == [f"{path} row 0", f"{path} row 1"]


GOOD = {"messages": [USER, ASSISTANT]}


@pytest.mark.parametrize(("row", "expected"), [
    ([1, 2], "row is a list of 2; expected a JSON object"),
    ({"conversation": []}, "row has no 'messages' field (its keys: conversation)"),
    ({"messages": []}, "messages is a list of 0; expected a non-empty list"),
    ({"messages": "hi"}, "messages is 'hi'; expected a non-empty list"),
    ({"messages": [USER, "hi"]}, "messages[1] is 'hi'; expected an object"),
    ({"messages": [USER, {"role": "bot", "content": "x"}]},
     "messages[1].role is 'bot'; expected one of system, user, assistant, tool"),
    ({"messages": [{"content": "x"}]}, "messages[0].role is missing; expected one of"),
    ({"messages": [{"role": "user"}]}, "messages[0].content is missing; expected a string"),
    ({"messages": [USER, {"role": "assistant", "content": None}]},
     "messages[1].content is null; expected a string (only an assistant message with tool_calls"),
    ({"messages": [USER, {"role": "assistant", "content": 5}]},
     "messages[1].content is 5; expected a string or a list of text parts"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[1] is an object; expected a text part"),
    ({"messages": [USER, {**ASSISTANT, "weight": -1}]},
     "messages[1].weight is -1; expected a number >= 0"),
    ({"messages": [USER, {**ASSISTANT, "weight": True}]}, "messages[1].weight is True"),
    ({"messages": [USER, {**ASSISTANT, "weight": "1"}]}, "messages[1].weight is '1'"),
    ({"messages": [{**USER, "tool_calls": [WEATHER_CALL]}]},
     "messages[0].tool_calls is only allowed on assistant messages (role is 'user')"),
    ({"messages": [USER, {"role": "assistant", "content": "", "tool_calls": WEATHER_CALL}]},
     "messages[1].tool_calls is an object; expected a list"),
    ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"arguments": "{}"}}]}]},
     "messages[1].tool_calls[0].function.name is missing; expected a non-empty string"),
    ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": 3}}]}]},
     "messages[1].tool_calls[0].function.arguments is 3; expected a JSON string or an object"),
    ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
        {**WEATHER_CALL, "type": "code"}]}]},
     "messages[1].tool_calls[0].type is 'code'; expected 'function'"),
    ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "name": "f"}]}]},
     "messages[1].tool_calls[0].function is missing; expected an object"),
    ({"messages": [USER, {"role": "tool", "content": "x", "tool_call_id": 7}]},
     "messages[1].tool_call_id is 7; expected a string"),
    ({"messages": [USER], "tools": {"name": "f"}}, "tools is an object; expected a list"),
])
def test_invalid_row_names_file_line_and_field(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", row])
    with pytest.raises(DatasetError) as error:
        load_chat_rows(str(path))
    assert str(error.value).startswith(f"{path}:3: {expected}")


def test_valid_edge_cases_are_accepted(tmp_path):
    messages = [
        {"role": "system", "content": "s", "extra_key": {"ignored": True}},
        {**USER, "weight": 0.0, "name": "alice"},
        {"role": "assistant", "tool_calls": [  # content may be left out next to tool_calls
            {"function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "c", "name": "f"},
        {"role": "assistant", "content": [{"type": "text", "text": "done"}], "weight": 2.5},
    ]
    rows = load_chat_rows(str(write_jsonl(tmp_path / "data.jsonl", [{"messages": messages}])))
    assert rows[0].messages == messages


def test_malformed_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, '{"messages": [}', GOOD])
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}:3: invalid JSON \(Expecting"):
        load_chat_rows(str(path))


def test_byte_order_mark_and_non_utf8_lines(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert load_chat_rows(str(bom))[0].messages == GOOD["messages"]

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "café"}'.encode("latin-1"))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(latin1))}:2: is not UTF-8 text"):
        load_chat_rows(str(latin1))


def test_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: has no rows"):
        load_chat_rows(str(path))


@pytest.mark.parametrize("name", ["missing.jsonl", "data/missing.parquet"])
def test_missing_file(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: file not found"):
        load_chat_rows(str(path))
    with pytest.raises(DatasetError, match="file not found"):
        dataset_fingerprint(str(path))


def test_unreachable_dataset_name(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError, match=r"^someone/chats: is neither a local file nor a "
                                           r"reachable dataset .*ConnectionError: no route"):
        load_chat_rows("someone/chats")


def test_dataset_saved_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    train = Dataset.from_list([{"messages": [USER, ASSISTANT], "answer": "Paris"}])
    test = Dataset.from_list([{"messages": [USER, {**ASSISTANT, "weight": 0}], "answer": "x"},
                              {"messages": [USER, ASSISTANT], "answer": "y"}])
    DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))

    rows = load_chat_rows(str(tmp_path / "dd"), split="test")
    assert [row.where for row in rows] == [f"{tmp_path / 'dd'} row 0", f"{tmp_path / 'dd'} row 1"]
    assert [row.fields["answer"] for row in rows] == ["x", "y"]
    assert rows[0].messages[1]["weight"] == 0
    assert load_chat_rows(str(tmp_path / "dd"))[0].fields == {"answer": "Paris"}
    with pytest.raises(DatasetError, match="has no split 'validation'; its splits are train, test"):
        load_chat_rows(str(tmp_path / "dd"), split="validation")


def test_dataset_rows_are_validated_with_row_index(tmp_path):
    from datasets import Dataset

    bad = {"role": "bot", "content": "x"}
    Dataset.from_list([{"messages": [USER, ASSISTANT]}, {"messages": [USER, bad]}]).save_to_disk(
        str(tmp_path / "ds"))
    where = re.escape(f"{tmp_path / 'ds'} row 1")
    with pytest.raises(DatasetError, match=rf"^{where}: messages\[1\]\.role is 'bot'"):
        load_chat_rows(str(tmp_path / "ds"))


def test_parquet_file_with_optional_keys(tokenizer, tmp_path):
    from datasets import Dataset

    # Arrow gives every message every key seen in the column (weight, tool_calls, ...), as None
    # where the message had none: None must mean "absent", not "invalid".
    path = tmp_path / "chats.parquet"
    Dataset.from_list([
        {"messages": [USER, ASSISTANT]},
        {"messages": [{**USER, "weight": 1}, {"role": "assistant", "content": "",
                                              "tool_calls": [WEATHER_CALL]}]},
    ]).to_parquet(str(path))
    rows = load_chat_rows(str(path))
    assert rows[0].messages[0]["weight"] is None and rows[0].messages[0]["tool_calls"] is None

    examples, _ = build_sft_examples(rows, tokenizer, max_seq_len=512)
    assert weighted_runs(tokenizer, examples[0].tokens, examples[0].weights) == [
        (ANSWER + "<|im_end|>", 1.0)]
    assert examples[1].line == 1
    assert weighted_runs(tokenizer, examples[1].tokens, examples[1].weights)[0] == (
        "<|im_start|>user\n" + USER["content"] + "<|im_end|>", 1.0)


# ---------------------------------------------------------------------------------------------
# build_sft_examples


def rows_of_lengths(tokenizer, answer_words: list[int]) -> tuple[list[ChatRow], list[int]]:
    rows = [chat_row([USER, {"role": "assistant", "content": " ".join(["Paris"] * n)}], line=i + 1)
            for i, n in enumerate(answer_words)]
    return rows, [len(render_chat(tokenizer, row.messages)[0]) for row in rows]


def test_long_rows_are_dropped(tokenizer):
    rows, lengths = rows_of_lengths(tokenizer, [2, 40, 3])
    examples, stats = build_sft_examples(rows, tokenizer, max_seq_len=lengths[2])
    assert [example.line for example in examples] == [1, 3]
    assert [len(example.tokens) for example in examples] == [lengths[0], lengths[2]]
    assert (stats.rows, stats.kept, stats.dropped_too_long, stats.truncated) == (3, 2, 1, 0)
    assert stats.tokens == lengths[0] + lengths[2]
    assert stats.loss_tokens == sum(sum(w > 0 for w in e.weights[1:]) for e in examples)


def test_long_rows_are_truncated(tokenizer):
    rows, lengths = rows_of_lengths(tokenizer, [2, 40])
    limit = lengths[0] + 5
    examples, stats = build_sft_examples(rows, tokenizer, max_seq_len=limit,
                                         long_row_policy="truncate")
    full_tokens, full_weights = render_chat(tokenizer, rows[1].messages)
    assert examples[1].tokens == full_tokens[:limit]
    assert examples[1].weights == full_weights[:limit]
    assert (stats.kept, stats.truncated, stats.dropped_too_long) == (2, 1, 0)


def test_long_row_error_names_row_length_limit_and_config(tokenizer):
    rows, lengths = rows_of_lengths(tokenizer, [2, 40])
    with pytest.raises(DatasetError) as error:
        build_sft_examples(rows, tokenizer, max_seq_len=lengths[0], long_row_policy="error")
    message = str(error.value)
    assert message.startswith(f"rows.jsonl:2: renders to {lengths[1]} tokens, more than "
                              f"max_seq_len={lengths[0]}")
    assert "long_row_policy" in message


def test_rows_without_trainable_tokens_are_dropped(tokenizer):
    short = [USER, {"role": "assistant", "content": "Paris"}]
    limit = len(render_chat(tokenizer, short)[0]) + 2
    rows = [
        chat_row(short, line=1),
        # Truncated inside its answer: kept.
        chat_row([USER, {"role": "assistant", "content": " ".join(["Paris"] * 40)}], line=2),
        # Truncated inside its prompt: nothing left to learn.
        chat_row([{"role": "user", "content": "Why? " * 40}, ASSISTANT], line=3),
        chat_row([USER], line=4),
        chat_row([USER, {"role": "assistant", "content": "Paris", "weight": 0}], line=5),
    ]
    examples, stats = build_sft_examples(rows, tokenizer, max_seq_len=limit,
                                         long_row_policy="truncate")
    assert [example.line for example in examples] == [1, 2]
    assert (stats.kept, stats.truncated, stats.dropped_no_trainable, stats.dropped_too_long) == (
        2, 2, 3, 0)


def test_first_token_is_never_a_target(tokenizer):
    # The first token has no prediction, so a row whose only weighted token is the first one has
    # nothing to train on.
    contents_only = with_template(tokenizer, "{% for m in messages %}{{ m.content }}{% endfor %}")
    messages = [{"role": "user", "content": "Paris", "weight": 1},
                {"role": "assistant", "content": " yes", "weight": 0}]
    weights = render_chat(contents_only, messages)[1]
    assert weights[0] == 1.0 and len(weights) > 1 and set(weights[1:]) == {0.0}
    rows = [chat_row(messages), chat_row([USER, ASSISTANT], line=2)]
    examples, stats = build_sft_examples(rows, contents_only, max_seq_len=64)
    assert [example.line for example in examples] == [2]
    assert stats.dropped_no_trainable == 1


def test_all_rows_dropped_explains_why(tokenizer):
    rows, lengths = rows_of_lengths(tokenizer, [30, 40])
    rows.append(chat_row([USER], line=3))
    with pytest.raises(DatasetError) as error:
        build_sft_examples(rows, tokenizer, max_seq_len=min(lengths) - 1)
    message = str(error.value)
    assert message.startswith("rows.jsonl: no usable rows: 3 rows: 0 kept")
    assert "2 dropped as too long, 1 dropped with nothing to train on" in message
    assert f"max_seq_len (now {min(lengths) - 1})" in message


def test_bad_policy_and_limits(tokenizer):
    rows, _ = rows_of_lengths(tokenizer, [2])
    with pytest.raises(ValueError, match="long_row_policy='clip': expected one of drop, "
                                         "truncate, error"):
        build_sft_examples(rows, tokenizer, max_seq_len=64, long_row_policy="clip")
    with pytest.raises(ValueError, match="max_seq_len is 1"):
        build_sft_examples(rows, tokenizer, max_seq_len=1)


def test_hand_built_rows_are_validated(tokenizer):
    with pytest.raises(DatasetError, match=r"^rows\.jsonl:7: messages\[0\]\.role is 'bot'"):
        build_sft_examples([chat_row([{"role": "bot", "content": "x"}], line=7)], tokenizer, 64)


def test_stats_summary():
    stats = DataStats(rows=10, kept=7, truncated=2, dropped_too_long=1, dropped_no_trainable=2,
                      tokens=700, loss_tokens=300)
    assert stats.summary() == ("10 rows: 7 kept (700 tokens, 300 trained on), 2 truncated, "
                               "1 dropped as too long, 2 dropped with nothing to train on")


# ---------------------------------------------------------------------------------------------
# example_to_datum


def test_example_to_datum_shifts_by_one():
    example = SFTExample(tokens=[5, 6, 7, 8], weights=[0.0, 0.0, 1.0, 0.5], source="s", line=1)
    datum = example_to_datum(example)
    assert datum.model_input.to_ints() == [5, 6, 7]
    targets, weights = datum.loss_fn_inputs["target_tokens"], datum.loss_fn_inputs["weights"]
    assert (targets.dtype, targets.shape, targets.tolist()) == ("int64", [3], [6, 7, 8])
    assert (weights.dtype, weights.shape, weights.tolist()) == ("float32", [3], [0.0, 1.0, 0.5])
    assert targets.to_torch().dtype == torch.int64
    assert weights.to_torch().dtype == torch.float32

    with pytest.raises(ValueError, match="needs at least 2"):
        example_to_datum(SFTExample(tokens=[5], weights=[1.0], source="s", line=1))


# ---------------------------------------------------------------------------------------------
# SupervisedDataset


def numbered_examples(n: int) -> list[SFTExample]:
    return [SFTExample(tokens=[i, i], weights=[0.0, 1.0], source="s", line=i) for i in range(n)]


def lines(examples: list[SFTExample]) -> list[int]:
    return [example.line for example in examples]


def test_order_is_a_function_of_seed_and_position_only():
    examples = numbered_examples(10)
    first = SupervisedDataset(examples, seed=3)
    np.random.seed(0)  # the global RNG must not matter
    order = lines(first.batch(0, 30))
    np.random.seed(1)
    again = SupervisedDataset(examples, seed=3)
    assert lines(again.batch(0, 30)) == order
    # Resuming mid-epoch, out of order, gives the same examples.
    assert lines(again.batch(17, 5)) == order[17:22]
    assert lines([again.example_at(p) for p in (29, 3, 12)]) == [order[29], order[3], order[12]]
    assert lines(SupervisedDataset(examples, seed=4).batch(0, 10)) != order[:10]


def test_every_example_once_per_epoch_with_fresh_permutations():
    dataset = SupervisedDataset(numbered_examples(10), seed=0)
    epochs = [lines(dataset.batch(10 * e, 10)) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert len({tuple(epoch) for epoch in epochs}) == 3
    assert epochs[0] == np.random.default_rng([0, 0]).permutation(10).tolist()
    assert epochs[1] == np.random.default_rng([0, 1]).permutation(10).tolist()


def test_batch_straddles_epochs():
    dataset = SupervisedDataset(numbered_examples(5), seed=1)
    epoch0, epoch1 = lines(dataset.batch(0, 5)), lines(dataset.batch(5, 5))
    assert lines(dataset.batch(3, 4)) == epoch0[3:] + epoch1[:2]
    assert len(dataset) == 5


def test_num_steps():
    dataset = SupervisedDataset(numbered_examples(10), seed=0)
    assert dataset.num_steps(epochs=1, batch_size=4) == 3
    assert dataset.num_steps(epochs=2, batch_size=4) == 5
    assert dataset.num_steps(epochs=3, batch_size=5) == 6


def test_dataset_argument_checks():
    with pytest.raises(ValueError, match="at least one example"):
        SupervisedDataset([], seed=0)
    with pytest.raises(ValueError, match="position is -1"):
        SupervisedDataset(numbered_examples(2), seed=0).example_at(-1)


# ---------------------------------------------------------------------------------------------
# dataset_fingerprint


def test_fingerprint_of_saved_dataset_follows_its_contents(tmp_path):
    from datasets import Dataset, DatasetDict

    def save(test_answer: str) -> str:
        test = Dataset.from_list([{"messages": [USER, {**ASSISTANT, "content": test_answer}]}])
        train = Dataset.from_list([GOOD])
        DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
        return dataset_fingerprint(str(tmp_path / "dd"), split="test")

    before = save("Paris.")
    assert dataset_fingerprint(str(tmp_path / "dd"), split="test") == before
    assert dataset_fingerprint(str(tmp_path / "dd"), split="train") != before
    assert save("Lyon.") != before


def test_fingerprint_follows_file_contents(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    before = dataset_fingerprint(str(path))
    assert re.fullmatch(r"[0-9a-f]{16}", before)
    copy = write_jsonl(tmp_path / "copy.jsonl", [GOOD])
    assert dataset_fingerprint(str(copy)) == before
    write_jsonl(path, [GOOD, GOOD])
    assert dataset_fingerprint(str(path)) != before


def test_prompt_completion_and_text_rows_train_without_a_chat_template(tmp_path, tokenizer):
    import pandas as pd

    from training.utils.data import render_text

    rows = [{"prompt": "2 + 2 =", "completion": " 4"}, {"text": "the sky is blue"},
            {"messages": [USER, ASSISTANT]}]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "mixed.parquet"
    pd.DataFrame([{"prompt": "2 + 2 =", "completion": " 4"}]).to_parquet(parquet)
    for source, count in ((jsonl, 3), (parquet, 1)):
        assert len(load_chat_rows(str(source), text_rows=True)) == count
    loaded = load_chat_rows(str(jsonl), text_rows=True)
    examples, stats = build_sft_examples(loaded, tokenizer, max_seq_len=64)
    assert stats.kept == 3
    prompt_ids = tokenizer("2 + 2 =", add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(" 4", add_special_tokens=False)["input_ids"]
    first = examples[0]
    assert first.tokens == [*prompt_ids, *completion_ids, tokenizer.eos_token_id]
    assert first.weights == [0.0] * len(prompt_ids) + [1.0] * (len(completion_ids) + 1)
    assert set(examples[1].weights) == {1.0}  # plain text: every token is trained on
    assert render_text(tokenizer, [("x", 1.0)])[0][-1] == tokenizer.eos_token_id
    # Without text_rows (RL prompts), and with a missing half, the row is refused by line.
    with pytest.raises(DatasetError, match=r"mixed.jsonl:1: row has no 'messages' field"):
        load_chat_rows(str(jsonl))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "2 + 2 ="}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: 'completion' is .*needs 'prompt' and "
                                           r"'completion' as strings"):
        load_chat_rows(str(bad), text_rows=True)
