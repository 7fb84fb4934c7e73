"""Training data, one module per stage: load, validate, render, fit, order.

The data format is OpenAI's chat fine-tuning format, as accepted by Fireworks and Tinker: one
JSON object per line with a ``messages`` list of ``{"role", "content"}`` messages, optional
``tool_calls`` on assistant messages, and an optional per-message ``weight`` (0 to skip a
message, 1 to train on it)::

    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]}

The pipeline a recipe runs, top to bottom (``README.md`` beside this file has the picture):

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

from training.utils.data.chats import (
    ROLES,
    ChatRow,
    load_chat_rows,
    validate_messages,
    validate_tools,
)
from training.utils.data.examples import (
    LONG_ROW_POLICIES,
    DataStats,
    LongRowPolicy,
    SFTExample,
    build_sft_examples,
    check_length_args,
    example_to_datum,
    fit_to_length,
    render_text,
)
from training.utils.data.ordering import (
    SupervisedDataset,
)
from training.utils.data.rendering import (
    ChatTemplateError,
    message_weight,
    render_chat,
)
from training.utils.data.sources import (
    DatasetError,
    dataset_fingerprint,
    location,
    read_records,
)

__all__ = [
    "ChatRow",
    "ChatTemplateError",
    "DataStats",
    "DatasetError",
    "LONG_ROW_POLICIES",
    "LongRowPolicy",
    "ROLES",
    "SFTExample",
    "SupervisedDataset",
    "build_sft_examples",
    "check_length_args",
    "dataset_fingerprint",
    "example_to_datum",
    "fit_to_length",
    "load_chat_rows",
    "location",
    "message_weight",
    "read_records",
    "render_text",
    "render_chat",
    "validate_messages",
    "validate_tools",
]
