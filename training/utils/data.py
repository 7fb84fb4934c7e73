"""SFT data: load chat rows, validate them, render them to tokens + loss weights, order them.

The data format is OpenAI's chat fine-tuning format, as accepted by Fireworks and Tinker: one
JSON object per line with a ``messages`` list of ``{"role", "content"}`` messages, optional
``tool_calls`` on assistant messages, and an optional per-message ``weight`` (0 to skip a
message, 1 to train on it)::

    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]}

The pipeline a recipe runs, top to bottom:

1. :func:`load_chat_rows` reads a JSONL file or a ``datasets`` source and validates every row
   before any expensive work, so a bad row fails in seconds with ``file:line`` and field path.
2. :func:`build_sft_examples` renders each row once with the tokenizer's chat template
   (:func:`render_chat`) into token ids plus a per-token loss weight, and applies the long-row
   policy.
3. :class:`SupervisedDataset` maps a position ``data_consumed`` (examples consumed since the start
   of training) to an example through a per-epoch permutation that depends only on ``seed`` and
   the epoch, so a run resumed from a checkpoint sees exactly the batches it would have seen.
4. :func:`example_to_datum` turns an example into the next-token :class:`Datum` of the built-in
   ``cross_entropy`` loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from training.sdk.choices import Choice
from training.sdk.types import Datum, ModelInput, TensorData

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
"""Message roles accepted in ``messages``."""

class LongRowPolicy(Choice):
    """What happens to a row longer than ``max_seq_len`` tokens (``long_row_policy``)."""

    drop = "drop"
    """Leave it out (counted in the data summary)."""
    truncate = "truncate"
    """Keep its first ``max_seq_len`` tokens."""
    error = "error"
    """Stop with an error naming the file and line."""


LONG_ROW_POLICIES = LongRowPolicy.values()

_JSON_LINES_SUFFIXES = (".jsonl", ".json")
# Local files handed to `datasets.load_dataset(<builder>, data_files=...)`.
_DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# Files that `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write into their directory.
_SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
_MAX_SHOWN_CHARS = 60


class DatasetError(ValueError):
    """A data source or one of its rows is unusable.

    The message names where (``data.jsonl:17``, ``<source> row 3``), which field
    (``messages[2].role``) and what to do about it.
    """


class ChatTemplateError(ValueError):
    """The tokenizer or its chat template cannot render a conversation the way
    :func:`render_chat` needs (no template, a template that rewrites earlier turns, a tokenizer
    without offset mappings)."""


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass
class ChatRow:
    """One validated conversation of a data source."""

    messages: list[dict]
    """The conversation, as in the source (OpenAI chat format); validated by the loader."""
    source: str
    """The data source as the user named it (a path or a ``datasets`` name)."""
    line: int
    """1-based line of a JSONL file, or 0-based row index (``dataset[line]``) of a ``datasets``
    source or JSON array; see :attr:`where`."""
    fields: dict = field(default_factory=dict)
    """The row's other top-level keys (``tools``, ground-truth answers for RL recipes, ...)."""
    line_kind: Literal["line", "row"] = "line"
    """Whether :attr:`line` is a file line (``"line"``) or a row index (``"row"``)."""

    @property
    def where(self) -> str:
        """Location for messages: ``data.jsonl:17`` or ``org/name row 3``."""
        if self.line_kind == "line":
            return f"{self.source}:{self.line}"
        return f"{self.source} row {self.line}"


def load_chat_rows(source: str, split: str = "train") -> list[ChatRow]:
    """Read and validate every row of a chat data source.

    Args:
        source: one of

            - a local ``.jsonl`` / ``.json`` file of JSON lines (a ``.json`` file holding one JSON
              array of rows is read too);
            - a local ``.parquet`` / ``.csv`` / ``.arrow`` file, read with ``datasets``;
            - a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or
              another directory ``datasets.load_dataset`` understands;
            - a Hugging Face hub dataset name (needs the hub or a populated HF cache).
        split: split to read from a ``DatasetDict`` directory or a hub dataset; ignored for files
            and for a directory holding a single saved ``Dataset``.

    Returns:
        The rows in source order.

    Raises:
        DatasetError: the source is missing, unreadable or empty, or a row is invalid. The message
            names the file and 1-based line (``data.jsonl:17``) or the 0-based row index
            (``<source> row 3``) and the field path (``messages[3].tool_calls[0].function.name``).
    """
    rows = [_make_row(obj, source, line, kind) for obj, line, kind in _read_records(source, split)]
    if not rows:
        raise DatasetError(f"{source}: has no rows; expected one JSON object with a 'messages' "
                           f"list per row")
    return rows


def read_records(source: str, split: str = "train") -> Iterator[tuple[Any, int, str]]:
    """Yield ``(record, line, where)`` for every raw, unvalidated record of a data source.

    Reads the same sources as :func:`load_chat_rows`, for loaders of other row formats.
    ``line`` is the 1-based line of a JSONL file or the 0-based row index of a ``datasets``
    source or JSON array; ``where`` is the location for error messages: ``data.jsonl:17`` or
    ``<source> row 3``.

    Raises:
        DatasetError: the source is missing or unreadable, or a line is not valid JSON.
    """
    for record, line, kind in _read_records(source, split):
        yield record, line, ChatRow(messages=[], source=source, line=line, line_kind=kind).where


def _read_records(source: str, split: str) -> Iterator[tuple[Any, int, Literal["line", "row"]]]:
    """Yield ``(record, line or row index, kind)`` for every record of ``source``."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in _JSON_LINES_SUFFIXES:
            return _read_json_lines(path, source)
        if suffix in _DATASETS_BUILDERS:
            return _read_datasets_rows(_load_datasets_file(path, source), source)
        raise DatasetError(f"{source}: unsupported file type {suffix or '(no suffix)'!r}; expected "
                           f"one of {', '.join(_JSON_LINES_SUFFIXES + tuple(_DATASETS_BUILDERS))}")
    if path.is_dir():
        return _read_datasets_rows(_load_datasets_dir(path, source, split), source)
    if _looks_like_path(source):
        raise DatasetError(f"{source}: file not found (looked at {path.resolve()}); check the "
                           f"path, which is relative to the working directory")
    return _read_datasets_rows(_load_hub_dataset(source, split), source)


def _looks_like_path(source: str) -> bool:
    """Whether a missing ``source`` was meant as a local path rather than a hub name."""
    suffix = Path(source).suffix.lower()
    return (source.startswith(("/", "./", "../", "~", "file:"))
            or "\\" in source
            or suffix in _JSON_LINES_SUFFIXES or suffix in _DATASETS_BUILDERS)


def _read_json_lines(path: Path, source: str) -> Iterator[tuple[Any, int, Literal["line", "row"]]]:
    with path.open("rb") as f:
        # Some exporters write a .json file as a single array of rows instead of JSON lines.
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        if path.suffix.lower() == ".json" and head.startswith(b"["):
            try:
                records = json.loads(f.read().decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                raise DatasetError(f"{source}: is not UTF-8 text ({e.reason}); re-encode the "
                                   f"file as UTF-8") from e
            except json.JSONDecodeError as e:
                raise DatasetError(f"{source}:{e.lineno}: invalid JSON ({e.msg}, column "
                                   f"{e.colno})") from e
            yield from ((record, index, "row") for index, record in enumerate(records))
            return
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on the first line: editors on Windows start files with a BOM.
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{source}:{lineno}: is not UTF-8 text ({e.reason} at byte "
                                   f"{e.start} of the line); re-encode the file as UTF-8") from e
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{source}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                                   f"each line must be one complete JSON object") from e
            yield record, lineno, "line"


def _load_datasets_file(path: Path, source: str) -> Any:
    import datasets  # deferred: importing datasets costs about a second JSONL users don't need

    try:
        return datasets.load_dataset(_DATASETS_BUILDERS[path.suffix.lower()],
                                     data_files=str(path), split="train")
    except Exception as e:
        raise DatasetError(f"{source}: could not be read with datasets "
                           f"({type(e).__name__}: {e})") from e


def _load_datasets_dir(path: Path, source: str, split: str) -> Any:
    import datasets

    if not any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS):
        # A folder of data files (or a cloned hub repo): let datasets infer the builder.
        try:
            return datasets.load_dataset(str(path), split=split)
        except Exception as e:
            raise DatasetError(f"{source}: directory is neither a save_to_disk dataset nor "
                               f"readable by datasets.load_dataset ({type(e).__name__}: "
                               f"{e})") from e
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DatasetError(f"{source}: could not be read with datasets.load_from_disk "
                           f"({type(e).__name__}: {e})") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"{source}: has no split {split!r}; its splits are "
                               f"{', '.join(loaded)}; set the data split to one of them")
        return loaded[split]
    return loaded


def _load_hub_dataset(source: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DatasetError(f"{source}: is neither a local file nor a reachable dataset "
                           f"(datasets.load_dataset({source!r}, split={split!r}) failed with "
                           f"{type(e).__name__}: {e}); check the path or the dataset name, or "
                           f"connect to the hub / populate the HF cache") from e


def _read_datasets_rows(dataset: Any, source: str) -> Iterator[tuple[Any, int, Literal["line", "row"]]]:
    for index, record in enumerate(dataset):
        # CSV cannot hold nested lists, so conversations arrive there as JSON strings.
        messages = record.get("messages")
        if isinstance(messages, str):
            try:
                record = {**record, "messages": json.loads(messages)}
            except json.JSONDecodeError as e:
                raise DatasetError(f"{source} row {index}: messages is a string that is not "
                                   f"valid JSON ({e.msg}, column {e.colno})") from e
        yield record, index, "row"


def _make_row(record: Any, source: str, line: int, kind: Literal["line", "row"]) -> ChatRow:
    row = ChatRow(messages=[], source=source, line=line, line_kind=kind)
    where = row.where
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: row is {_show(record)}; expected a JSON object like "
                           '{"messages": [{"role": "user", "content": "..."}, ...]}')
    if record.get("messages") is None:
        keys = ", ".join(map(str, record)) or "none"
        raise DatasetError(f"{where}: row has no 'messages' field (its keys: {keys}); expected "
                           "a list of {\"role\": ..., \"content\": ...} messages")
    row.messages = record["messages"]
    row.fields = {k: v for k, v in record.items() if k != "messages"}
    _validate_messages(row.messages, where)
    tools = _validate_tools(row.fields.get("tools"), where)
    if tools is not None:
        row.fields["tools"] = tools  # parsed, if the source held it as a JSON string
    return row


def _show(value: Any) -> str:
    """Short repr of a value for an error message."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[:_MAX_SHOWN_CHARS - 3] + "..."


def _validate_tools(tools: Any, where: str) -> list | None:
    """``tools`` (function definitions shown to the template) as a list, or None if absent."""
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: tools is a string that is not valid JSON "
                               f"({e.msg})") from e
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DatasetError(f"{where}: tools is {_show(tools)}; expected a list of tool "
                           'definitions like {"type": "function", "function": {"name": ...}}')
    return tools


def _validate_messages(messages: Any, where: str, field: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: {field} is {_show(messages)}; expected a non-empty list "
                           'of {"role": ..., "content": ...} messages')
    for i, message in enumerate(messages):
        _validate_message(message, f"{field}[{i}]", where)


def validate_messages(messages: Any, where: str, field: str = "messages") -> None:
    """Check a list of OpenAI chat messages, as :func:`load_chat_rows` checks ``messages``.

    For loaders of other row formats (preference pairs, RL prompts) that embed message lists.

    Args:
        messages: the value to check.
        where: the row's location for the message (``data.jsonl:17``).
        field: the value's field path in the row (``preferred_output``, ``input.messages``).

    Raises:
        DatasetError: naming ``where`` and the field path (``preferred_output[0].role``).
    """
    _validate_messages(messages, where, field)


def validate_tools(tools: Any, where: str) -> list | None:
    """A row's ``tools`` as a list (parsed if a JSON string), or None if absent.

    Raises:
        DatasetError: naming ``where``, if ``tools`` is not a list of tool definitions.
    """
    return _validate_tools(tools, where)


def _validate_message(message: Any, path: str, where: str) -> None:
    def fail(detail: str) -> DatasetError:
        return DatasetError(f"{where}: {path}{detail}")

    if not isinstance(message, dict):
        raise fail(f" is {_show(message)}; expected an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        shown = "missing" if role is None else _show(role)
        raise fail(f".role is {shown}; expected one of {', '.join(ROLES)}")

    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise fail(f".tool_calls is only allowed on assistant messages (role is {role!r}); "
                       f"put tool results in a 'tool' message instead")
        if not isinstance(tool_calls, list):
            raise fail(f".tool_calls is {_show(tool_calls)}; expected a list of "
                       '{"type": "function", "function": {"name": ..., "arguments": ...}}')
        for j, call in enumerate(tool_calls):
            _validate_tool_call(call, f"{path}.tool_calls[{j}]", where)

    content = message.get("content")
    if content is None:
        if role != "assistant" or not tool_calls:
            shown = "missing" if "content" not in message else "null"
            raise fail(f".content is {shown}; expected a string (only an assistant message with "
                       f"tool_calls may have no content)")
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if (not isinstance(part, dict) or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)):
                raise fail(f".content[{j}] is {_show(part)}; expected a text part "
                           '{"type": "text", "text": "..."} (only text is supported)')
    elif not isinstance(content, str):
        raise fail(f".content is {_show(content)}; expected a string or a list of text parts")

    weight = message.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or not math.isfinite(weight) or weight < 0):
        raise fail(f".weight is {_show(weight)}; expected a number >= 0 (0 to skip the message, "
                   f"1 to train on it)")

    for key in ("tool_call_id", "name"):
        value = message.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f".{key} is {_show(value)}; expected a string")


def _validate_tool_call(call: Any, path: str, where: str) -> None:
    def fail(detail: str) -> DatasetError:
        return DatasetError(f"{where}: {path}{detail}")

    if not isinstance(call, dict):
        raise fail(f" is {_show(call)}; expected "
                   '{"type": "function", "function": {"name": ..., "arguments": ...}}')
    # `type` is required by OpenAI but often left out by exporters; only a wrong value is an error.
    if call.get("type") not in (None, "function"):
        raise fail(f".type is {_show(call['type'])}; expected 'function'")
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise fail(f".id is {_show(call['id'])}; expected a string")
    function = call.get("function")
    if not isinstance(function, dict):
        shown = "missing" if function is None else _show(function)
        raise fail(f".function is {shown}; expected an object with 'name' and 'arguments'")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        shown = "missing" if name is None else _show(name)
        raise fail(f".function.name is {shown}; expected a non-empty string")
    arguments = function.get("arguments")
    if not isinstance(arguments, (str, dict)):
        shown = "missing" if arguments is None else _show(arguments)
        raise fail(f".function.arguments is {shown}; expected a JSON string or an object")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise fail(f".function.arguments is not valid JSON ({e}): {_show(arguments)}; "
                       f"expected a JSON object such as '{{\"city\": \"Paris\"}}'") from None
        if not isinstance(parsed, dict):
            raise fail(f".function.arguments is JSON {type(parsed).__name__}, not an object: "
                       f"{_show(arguments)}")


# ---------------------------------------------------------------------------------------------
# Rendering


def message_weight(message: dict) -> float:
    """Loss weight of a message's tokens: its ``weight`` field, else 1 for assistant messages and
    0 for the others."""
    weight = message.get("weight")
    if weight is not None:
        return float(weight)
    return 1.0 if message.get("role") == "assistant" else 0.0


def render_chat(tokenizer: Any, messages: Sequence[dict], *,
                tools: list[dict] | None = None) -> tuple[list[int], list[float]]:
    """Render a conversation with the tokenizer's chat template into tokens and loss weights.

    Each token gets the weight (:func:`message_weight`) of the message whose rendered text holds
    the token's last character. An assistant message's text is its content, its tool calls and
    its end-of-turn token (``<|im_end|>`` in ChatML), not the header the template emits as the
    generation prompt (``<|im_start|>assistant\\n``). Any other message's text runs from the end
    of the previous message, so it includes its role header. A token made only of whitespace the
    template writes after a message (the ``\\n`` after ``<|im_end|>``) gets weight 0: the model
    never generates it, since it stops at the end-of-turn token.

    Message boundaries come from rendering prefixes of the conversation, which must be prefixes
    of the full rendering. Templates that rewrite earlier turns depending on what follows (for
    example Qwen3's, which drops the ``<think>`` block of earlier assistant turns) fall back to
    locating each weighted assistant turn by its content in the full rendering: it is trained as
    the template shows it in context, from after its header to its end-of-turn token; with such
    a template only assistant turns may carry weight (else :class:`ChatTemplateError`). A template without ``add_generation_prompt`` support still
    renders correctly, but its assistant headers are then trained on.

    Args:
        tokenizer: a Hugging Face fast tokenizer with a chat template.
        messages: the conversation (OpenAI chat format, validated here). ``weight`` keys are not
            shown to the template; text content parts are joined; JSON-string tool-call
            arguments are passed as objects, which is what Hugging Face templates expect.
        tools: tool definitions for templates that render them (the row's ``tools`` field).

    Returns:
        ``(tokens, weights)``: token ids of the whole conversation (no special tokens added beyond
        what the template writes) and one loss weight per token.

    Raises:
        DatasetError: a message is invalid.
        ChatTemplateError: the tokenizer or template cannot render the conversation as needed.
    """
    _validate_messages(messages, "render_chat")
    return _render_validated(tokenizer, messages, _validate_tools(tools, "render_chat"))


def _render_validated(tokenizer: Any, messages: Sequence[dict],
                      tools: list[dict] | None) -> tuple[list[int], list[float]]:
    template_messages = [_template_message(m) for m in messages]
    full = _apply_template(tokenizer, template_messages, tools, add_generation_prompt=False)
    try:
        char_weights, trailing = _weights_by_prefixes(tokenizer, messages, template_messages,
                                                      tools, full)
    except ChatTemplateError as prefix_error:
        # Templates that rewrite history (Qwen3 strips earlier <think> blocks) have no stable
        # prefixes; assistant turns can still be found by their content, in order.
        char_weights, trailing = _weights_by_content(tokenizer, messages, template_messages,
                                                     tools, full, prefix_error)
    return _token_weights(tokenizer, full, char_weights, trailing)


def _weights_by_prefixes(tokenizer: Any, messages: Sequence[dict],
                         template_messages: list[dict], tools: list[dict] | None,
                         full: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-character weights from the lengths of rendered conversation prefixes."""

    def prefix_length(count: int, add_generation_prompt: bool) -> int:
        text = _apply_template(tokenizer, template_messages[:count], tools, add_generation_prompt)
        if not full.startswith(text):
            raise ChatTemplateError(
                f"chat template of tokenizer {_tokenizer_name(tokenizer)}: rendering the first "
                f"{count} messages (add_generation_prompt={add_generation_prompt}) is not a prefix "
                f"of rendering the whole conversation, so message boundaries are ambiguous; "
                f"templates that rewrite earlier turns (e.g. strip <think> blocks of earlier "
                f"assistant turns) are not supported: use a template that renders each turn the "
                f"same way whatever follows it")
        return len(text)

    char_weights = np.zeros(len(full), dtype=np.float64)
    # Whitespace the template writes after a weighted message (the "\n" after "<|im_end|>").
    trailing = np.zeros(len(full), dtype=bool)
    for i, message in enumerate(messages):
        weight = message_weight(message)
        # Only boundaries of weighted messages matter: everything else has weight 0 anyway, and
        # skipping them spares templates that merge neighbouring unweighted turns (e.g. Qwen2.5
        # puts consecutive tool results in one user turn).
        if weight == 0:
            continue
        end = len(full) if i + 1 == len(messages) else prefix_length(i + 1, False)
        if message["role"] == "assistant":
            start = (prefix_length(i, True) if i > 0
                     else _first_header_end(tokenizer, full, tools, end))
        else:
            start = prefix_length(i, False) if i > 0 else 0
        char_weights[start:end] = weight
        core_end = end
        while core_end > start and full[core_end - 1].isspace():
            core_end -= 1
        trailing[core_end:end] = True
    return char_weights, trailing


_FALLBACK_WARNED: set[str] = set()


def _weights_by_content(tokenizer: Any, messages: Sequence[dict],
                        template_messages: list[dict], tools: list[dict] | None, full: str,
                        prefix_error: ChatTemplateError) -> tuple[np.ndarray, np.ndarray]:
    """Per-character weights for templates without stable prefixes.

    Each weighted assistant turn is located by searching its content in the full rendering,
    after the previous one; its span runs from the end of the assistant header before it (so a
    rendered ``<think>`` block is included) to the end-of-turn token after it (so rendered tool
    calls are included). Only assistant turns can carry weight this way.
    """
    name = _tokenizer_name(tokenizer)
    end_token = getattr(tokenizer, "eos_token", None) or ""
    probe = [{"role": "user", "content": "x"}]
    without = _apply_template(tokenizer, probe, tools, add_generation_prompt=False)
    with_prompt = _apply_template(tokenizer, probe, tools, add_generation_prompt=True)
    header = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    char_weights = np.zeros(len(full), dtype=np.float64)
    trailing = np.zeros(len(full), dtype=bool)
    cursor = 0
    for i, (message, shown) in enumerate(zip(messages, template_messages, strict=True)):
        weight = message_weight(message)
        if weight == 0:
            continue
        if message["role"] != "assistant":
            raise ChatTemplateError(
                f"{prefix_error} (messages[{i}] is a weighted {message['role']} turn; only "
                f"assistant turns can be trained with such a template)") from prefix_error
        content = shown.get("content") or ""
        needle = re.sub(r"(?s)^\s*<think>.*?</think>\s*", "", content).strip()
        found = full.find(needle, cursor) if needle else -1
        if found < 0:
            raise ChatTemplateError(
                f"{prefix_error} (and messages[{i}]'s content could not be located in the "
                f"rendering either)") from prefix_error
        start = found
        if header:
            header_at = full.rfind(header.strip(), cursor, found)
            if header_at >= 0:
                start = header_at + len(header.strip())
                while start < found and full[start] in "\n":
                    start += 1
        end = found + len(needle)
        if end_token:
            end_at = full.find(end_token, end)
            next_header = full.find(header.strip(), end) if header else -1
            if end_at >= 0 and (next_header < 0 or end_at < next_header):
                end = end_at + len(end_token)
        char_weights[start:end] = weight
        cursor = end
    if name not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(name)
        logger.warning("chat template of tokenizer %s rewrites earlier turns; assistant turns "
                       "are located by their content instead (only assistant turns train)",
                       name)
    return char_weights, trailing


def _token_weights(tokenizer: Any, full: str, char_weights: np.ndarray,
                   trailing: np.ndarray) -> tuple[list[int], list[float]]:
    """Token ids of ``full`` and the weight of each (decided by its last character)."""
    tokens, offsets = _tokenize_with_offsets(tokenizer, full)
    if not tokens or not full:
        return tokens, [0.0] * len(tokens)
    offsets_array = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).clip(0, len(full))
    starts = offsets_array[:, 0].clip(max=len(full) - 1)
    # Zero-width offsets (some tokenizers trim whitespace from them) stand for their start char.
    ends = np.maximum(offsets_array[:, 1], starts + 1)
    # A token's last character decides its weight, so a token that merges text across a message
    # boundary counts for the message it completes ...
    weights = char_weights[ends - 1]
    # ... except a token made only of trailing whitespace: the model never generates it, as it
    # stops at the end-of-turn token. A token merging content with it (".\n") keeps its weight.
    trailing_before = np.concatenate([[0], np.cumsum(trailing)])
    only_trailing = trailing_before[ends] - trailing_before[starts] == ends - starts
    weights[only_trailing] = 0.0
    return tokens, weights.tolist()


def _first_header_end(tokenizer: Any, full: str, tools: list[dict] | None, end: int) -> int:
    """Start of an assistant message that opens the conversation.

    Templates refuse to render an empty conversation, so the generation prompt cannot be rendered
    as a prefix; find the header it would write (measured after a probe user turn) instead.
    """
    probe = [{"role": "user", "content": ""}]
    try:
        without = _apply_template(tokenizer, probe, tools, add_generation_prompt=False)
        with_prompt = _apply_template(tokenizer, probe, tools, add_generation_prompt=True)
    except ChatTemplateError:
        return 0
    header = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    position = full.find(header, 0, end) if header else -1
    return position + len(header) if position >= 0 else 0


def _template_message(message: dict) -> dict:
    """The message as chat templates expect it: no ``weight``, no null keys (``datasets`` rows
    carry every column's keys), text content, object tool-call arguments."""
    out = {k: v for k, v in message.items() if k != "weight" and v is not None}
    content = message.get("content")
    if isinstance(content, list):
        out["content"] = "".join(part["text"] for part in content)
    elif content is None:
        # Templates concatenate content as a string; "" renders the same as no content.
        out["content"] = ""
    tool_calls = message.get("tool_calls")
    if tool_calls:
        out["tool_calls"] = [_template_tool_call(call) for call in tool_calls]
    else:
        out.pop("tool_calls", None)
    return out


def _template_tool_call(call: dict) -> dict:
    function = call["function"]
    arguments = function["arguments"]
    if isinstance(arguments, str):
        # Hugging Face templates (Qwen2.5, Llama 3.1, Mistral) write arguments with `tojson`,
        # which would double-encode OpenAI's JSON string; templates that take strings also take
        # objects. Validation made sure the string is a JSON object.
        arguments = json.loads(arguments)
    out = {k: v for k, v in call.items() if v is not None}
    out["type"] = "function"
    out["function"] = {**{k: v for k, v in function.items() if v is not None},
                       "arguments": arguments}
    return out


def _apply_template(tokenizer: Any, messages: list[dict], tools: list[dict] | None,
                    add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"tokenizer {_tokenizer_name(tokenizer)} has no chat template; "
                                f"use a tokenizer_model with one (e.g. an instruct model's)")
    try:
        # transformers 5 returns a BatchEncoding unless tokenize=False.
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:
        raise ChatTemplateError(f"chat template of tokenizer {_tokenizer_name(tokenizer)} failed "
                                f"on a conversation of {len(messages)} messages "
                                f"({type(e).__name__}: {e})") from e
    if not isinstance(text, str):
        raise ChatTemplateError(f"chat template of tokenizer {_tokenizer_name(tokenizer)} returned "
                                f"{type(text).__name__}, expected a string with tokenize=False")
    return text


def _tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        # verbose=False: the "longer than model_max_length" warning is for models; max_seq_len and
        # long_row_policy decide about long rows here.
        encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False,
                             verbose=False)
    except NotImplementedError as e:
        raise ChatTemplateError(f"tokenizer {_tokenizer_name(tokenizer)} gives no offset "
                                f"mapping; load a fast tokenizer (use_fast=True)") from e
    return list(encoding["input_ids"]), list(encoding["offset_mapping"])


def _tokenizer_name(tokenizer: Any) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


# ---------------------------------------------------------------------------------------------
# Examples


@dataclass
class SFTExample:
    """One rendered conversation, ready to train on."""

    tokens: list[int]
    """Token ids of the whole conversation, at most ``max_seq_len`` of them."""
    weights: list[float]
    """Loss weight of each token (same length as ``tokens``); 0 for tokens not trained on."""
    source: str
    """Data source the row came from."""
    line: int
    """1-based line (JSONL) or 0-based row index of the row in ``source``."""


@dataclass
class DataStats:
    """What :func:`build_sft_examples` did with the rows.

    ``kept + dropped_too_long + dropped_no_trainable == rows``; ``truncated`` counts rows cut to
    ``max_seq_len`` (kept, or dropped afterwards for lack of trainable tokens).
    """

    rows: int = 0
    """Rows given."""
    kept: int = 0
    """Rows turned into examples."""
    truncated: int = 0
    """Rows longer than ``max_seq_len`` tokens cut to their first ``max_seq_len`` tokens."""
    dropped_too_long: int = 0
    """Rows longer than ``max_seq_len`` tokens dropped (``long_row_policy="drop"``)."""
    dropped_no_trainable: int = 0
    """Rows dropped because no target token has positive weight (after truncation)."""
    tokens: int = 0
    """Tokens in the kept examples."""
    loss_tokens: int = 0
    """Target positions with positive weight in the kept examples (next-token form)."""

    def summary(self) -> str:
        """One line for logs."""
        return (f"{self.rows} rows: {self.kept} kept ({self.tokens} tokens, {self.loss_tokens} "
                f"trained on), {self.truncated} truncated, {self.dropped_too_long} dropped as too "
                f"long, {self.dropped_no_trainable} dropped with nothing to train on")


def build_sft_examples(rows: Sequence[ChatRow], tokenizer: Any, max_seq_len: int,
                       long_row_policy: str = "drop") -> tuple[list[SFTExample], DataStats]:
    """Render rows into training examples, applying the long-row policy.

    Each row is rendered once (:func:`render_chat`, with the row's ``tools`` field). Rows whose
    examples would train on nothing (no token after the first with positive weight: the first
    token is never a target) are dropped and counted.

    Args:
        rows: validated rows, usually from :func:`load_chat_rows`.
        tokenizer: a Hugging Face fast tokenizer with a chat template.
        max_seq_len: most tokens per example (the model input is one token shorter).
        long_row_policy: for rows longer than ``max_seq_len`` tokens: ``"drop"`` skips them,
            ``"truncate"`` keeps their first ``max_seq_len`` tokens, ``"error"`` raises.

    Returns:
        ``(examples, stats)``, examples in row order.

    Raises:
        ValueError: unknown ``long_row_policy`` or ``max_seq_len`` below 2.
        DatasetError: a row is invalid, cannot be rendered, or is too long under ``"error"``; or
            no row is left.
    """
    if long_row_policy not in LONG_ROW_POLICIES:
        raise ValueError(f"long_row_policy is {long_row_policy!r}; expected one of "
                         f"{', '.join(LONG_ROW_POLICIES)}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len is {max_seq_len!r}; expected an integer >= 2 (tokens)")

    stats = DataStats(rows=len(rows))
    examples: list[SFTExample] = []
    for row in rows:
        # Rows built by hand skip the loader's checks; validating again costs O(messages).
        _validate_messages(row.messages, row.where)
        tools = _validate_tools(row.fields.get("tools"), row.where)
        try:
            tokens, weights = _render_validated(tokenizer, row.messages, tools)
        except ChatTemplateError as e:
            raise DatasetError(f"{row.where}: {e}") from e
        if len(tokens) > max_seq_len:
            if long_row_policy == "error":
                raise DatasetError(
                    f"{row.where}: renders to {len(tokens)} tokens, more than max_seq_len="
                    f"{max_seq_len}; raise max_seq_len, or set long_row_policy to 'truncate' "
                    f"(keep the first max_seq_len tokens) or 'drop' (skip such rows)")
            if long_row_policy == "drop":
                stats.dropped_too_long += 1
                continue
            tokens, weights = tokens[:max_seq_len], weights[:max_seq_len]
            stats.truncated += 1
        loss_tokens = sum(1 for w in weights[1:] if w > 0)
        if loss_tokens == 0:
            stats.dropped_no_trainable += 1
            continue
        examples.append(SFTExample(tokens=tokens, weights=weights, source=row.source,
                                   line=row.line))
        stats.kept += 1
        stats.tokens += len(tokens)
        stats.loss_tokens += loss_tokens

    if not examples:
        sources = ", ".join(sorted({row.source for row in rows})) or "(no rows given)"
        raise DatasetError(
            f"{sources}: no usable rows: {stats.summary()}. Rows dropped as too long need a larger "
            f"max_seq_len (now {max_seq_len}) or long_row_policy='truncate'; rows with nothing to "
            f"train on have no assistant message, or only messages with weight 0")
    return examples, stats


def example_to_datum(example: SFTExample) -> Datum:
    """Next-token datum for the built-in ``cross_entropy`` loss.

    ``model_input`` is ``tokens[:-1]``; ``loss_fn_inputs`` holds ``target_tokens`` (int64,
    ``tokens[1:]``) and ``weights`` (float32, ``weights[1:]``): position ``i`` predicts token
    ``i + 1`` with that token's weight.
    """
    if len(example.tokens) != len(example.weights):
        raise ValueError(f"example from {example.source}:{example.line} has {len(example.tokens)} "
                         f"tokens but {len(example.weights)} weights")
    if len(example.tokens) < 2:
        raise ValueError(f"example from {example.source}:{example.line} has "
                         f"{len(example.tokens)} tokens; a datum needs at least 2")
    n = len(example.tokens) - 1
    return Datum(
        model_input=ModelInput.from_ints(example.tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData(data=[int(t) for t in example.tokens[1:]], dtype="int64",
                                        shape=[n]),
            "weights": TensorData(data=[float(w) for w in example.weights[1:]], dtype="float32",
                                  shape=[n]),
        },
    )


# ---------------------------------------------------------------------------------------------
# Order


ExampleT = TypeVar("ExampleT")


class SupervisedDataset(Generic[ExampleT]):
    """Examples in a deterministic, resumable order.

    Any example type works (:class:`SFTExample`, preference pairs, ...): the order depends only
    on how many there are.

    Position ``p`` (0-based count of examples consumed since the start of training, the
    checkpoints' ``data_consumed``) is example ``perm_e[p % n]`` of epoch ``e = p // n``, where
    ``perm_e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``. The order
    depends on nothing but ``seed`` and the examples, so a resumed run continues exactly where
    the saved one stopped; every example appears once per epoch, and batches may straddle epochs.
    """

    def __init__(self, examples: Sequence[ExampleT], seed: int) -> None:
        if not examples:
            raise ValueError("SupervisedDataset needs at least one example")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed is {seed!r}; expected a non-negative integer")
        self.examples = list(examples)
        self.seed = int(seed)
        self._cached_epoch = -1
        self._cached_perm = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Examples per epoch."""
        return len(self.examples)

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of example indices in ``epoch`` (0-based)."""
        if epoch < 0:
            raise ValueError(f"epoch is {epoch}; expected >= 0")
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, int(epoch)])
            self._cached_perm = rng.permutation(len(self.examples))
            self._cached_epoch = epoch
        return self._cached_perm

    def example_at(self, position: int) -> ExampleT:
        """Example at ``position`` (0-based count of examples consumed since training began)."""
        if position < 0:
            raise ValueError(f"position is {position}; expected >= 0")
        epoch, index = divmod(int(position), len(self.examples))
        return self.examples[int(self.permutation(epoch)[index])]

    def batch(self, data_consumed: int, batch_size: int) -> list[ExampleT]:
        """Examples at positions ``data_consumed`` .. ``data_consumed + batch_size - 1``."""
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}; expected >= 1")
        return [self.example_at(p) for p in range(data_consumed, data_consumed + batch_size)]

    def num_steps(self, epochs: int, batch_size: int, max_steps: int | None = None) -> int:
        """Optimizer steps to consume ``epochs`` epochs in batches of ``batch_size`` examples
        (``ceil(epochs * len(self) / batch_size)``; the last batch runs into the next epoch),
        capped at ``max_steps`` when given."""
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs={epochs}, batch_size={batch_size}; both must be >= 1")
        steps = -(-epochs * len(self.examples) // batch_size)
        return steps if max_steps is None else min(steps, max_steps)


# ---------------------------------------------------------------------------------------------
# Fingerprint


def dataset_fingerprint(source: str, split: str = "train") -> str:
    """Identity of a data source's contents, stored with checkpoints to refuse resuming on
    changed data.

    A local file: the first 16 hex digits of the SHA-256 of its bytes. A ``datasets`` source
    (saved directory or hub name): the dataset's ``_fingerprint`` for ``split``.

    Raises:
        DatasetError: the source cannot be found or read.
    """
    path = Path(source).expanduser()
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:16]
    if path.is_dir():
        return str(_load_datasets_dir(path, source, split)._fingerprint)
    if _looks_like_path(source):
        raise DatasetError(f"{source}: file not found (looked at {path.resolve()})")
    return str(_load_hub_dataset(source, split)._fingerprint)
