"""Stage 3: rendering. A conversation through the tokenizer's chat template into token ids
and a per-token loss weight (each message's ``weight``, by default 1 for assistant messages)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from training.utils.data.chats import _validate_messages, _validate_tools

logger = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The tokenizer or its chat template cannot render a conversation the way
    :func:`render_chat` needs (no template, a template that rewrites earlier turns, a tokenizer
    without offset mappings)."""


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
