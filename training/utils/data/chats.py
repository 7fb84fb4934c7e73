"""Stage 2: chat rows. Every record validated as an OpenAI-format conversation (roles,
contents, tool calls, weights) before any expensive work, so a bad row fails in seconds with
``file:line`` and the field path."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from training.utils.data.sources import DatasetError, _read_records, location

logger = logging.getLogger(__name__)


ROLES = ("system", "user", "assistant", "tool")
"""Message roles accepted in ``messages``."""


_MAX_SHOWN_CHARS = 60


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
    text: list[tuple[str, float]] | None = None
    """A row of raw text instead of a conversation (no chat template): its segments with their
    loss weight, ``[(prompt, 0), (completion, 1)]`` or ``[(text, 1)]``; None for chats."""
    """Whether :attr:`line` is a file line (``"line"``) or a row index (``"row"``)."""

    @property
    def where(self) -> str:
        """Location for messages: ``data.jsonl:17`` or ``org/name row 3``."""
        return location(self.source, self.line, self.line_kind)


def load_chat_rows(source: str, split: str = "train", *,
                   text_rows: bool = False) -> list[ChatRow]:
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
        text_rows: also accept raw-text rows (SFT): ``{"prompt": ..., "completion": ...}``
            (trained on the completion only) and ``{"text": ...}`` (continued pre-training,
            trained on all of it); see :attr:`ChatRow.text`.

    Returns:
        The rows in source order.

    Raises:
        DatasetError: the source is missing, unreadable or empty, or a row is invalid. The message
            names the file and 1-based line (``data.jsonl:17``) or the 0-based row index
            (``<source> row 3``) and the field path (``messages[3].tool_calls[0].function.name``).
    """
    rows = [_make_row(obj, source, line, kind, text_rows)
            for obj, line, kind in _read_records(source, split)]
    if not rows:
        raise DatasetError(f"{source}: has no rows; expected one JSON object with a 'messages' "
                           f"list per row")
    return rows


_TEXT_FORMATS = ('{"messages": [...]} (a chat), {"prompt": "...", "completion": "..."} or '
                 '{"text": "..."}')


def _make_row(record: Any, source: str, line: int, kind: Literal["line", "row"],
              text_rows: bool = False) -> ChatRow:
    row = ChatRow(messages=[], source=source, line=line, line_kind=kind)
    where = row.where
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: row is {_show(record)}; expected a JSON object like "
                           '{"messages": [{"role": "user", "content": "..."}, ...]}')
    if record.get("messages") is None and text_rows and (
            "text" in record or "prompt" in record or "completion" in record):
        return _make_text_row(row, record)
    if record.get("messages") is None:
        keys = ", ".join(map(str, record)) or "none"
        expected = (f"one of {_TEXT_FORMATS}" if text_rows else
                    "a list of {\"role\": ..., \"content\": ...} messages")
        raise DatasetError(f"{where}: row has no 'messages' field (its keys: {keys}); expected "
                           f"{expected}")
    row.messages = record["messages"]
    row.fields = {k: v for k, v in record.items() if k != "messages"}
    _validate_messages(row.messages, where)
    tools = _validate_tools(row.fields.get("tools"), where)
    if tools is not None:
        row.fields["tools"] = tools  # parsed, if the source held it as a JSON string
    return row


def _make_text_row(row: ChatRow, record: dict) -> ChatRow:
    """A prompt/completion or text row: validated strings, no chat template."""
    where = row.where
    if "prompt" in record or "completion" in record:
        keys, weights = ("prompt", "completion"), (0.0, 1.0)
    else:
        keys, weights = ("text",), (1.0,)
    for key in keys:
        value = record.get(key)
        if not isinstance(value, str):
            raise DatasetError(f"{where}: '{key}' is {_show(value)}; a {' + '.join(keys)} row "
                               f"needs {' and '.join(repr(k) for k in keys)} as strings")
    if not record[keys[-1]]:
        raise DatasetError(f"{where}: '{keys[-1]}' is empty: nothing to train on")
    row.text = [(record[key], weight) for key, weight in zip(keys, weights, strict=True)]
    row.fields = {k: v for k, v in record.items() if k not in keys}
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
