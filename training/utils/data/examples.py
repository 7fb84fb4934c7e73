"""Stage 4: examples. Rendered rows fitted to ``max_seq_len`` (the long-row policy) and
turned into the next-token datums of the built-in ``cross_entropy`` loss."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from training.sdk.choices import Choice
from training.sdk.types import Datum, ModelInput, TensorData
from training.utils.data.chats import ChatRow, _validate_messages, _validate_tools
from training.utils.data.rendering import ChatTemplateError, _render_validated
from training.utils.data.sources import DatasetError

logger = logging.getLogger(__name__)


class LongRowPolicy(Choice):
    """What happens to a row longer than ``max_seq_len`` tokens (``long_row_policy``)."""

    drop = "drop"
    """Leave it out (counted in the data summary)."""
    truncate = "truncate"
    """Keep its first ``max_seq_len`` tokens."""
    error = "error"
    """Stop with an error naming the file and line."""


LONG_ROW_POLICIES = LongRowPolicy.values()


def check_length_args(max_seq_len: Any, long_row_policy: LongRowPolicy | str) -> LongRowPolicy:
    """The policy as a member, once ``max_seq_len`` is known to be an integer >= 2.

    Raises:
        ValueError: naming the bad argument.
    """
    policy = LongRowPolicy.parse(long_row_policy, "long_row_policy")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len is {max_seq_len!r}; expected an integer >= 2 (tokens)")
    return policy


TokenSequences = list[tuple[list[int], list[float]]]
"""``(tokens, weights)`` of each sequence of a row."""


def fit_to_length(sequences: TokenSequences, max_seq_len: int, policy: LongRowPolicy,
                  where: str, error: type[DatasetError] = DatasetError,
                  ) -> TokenSequences | None:
    """The token sequences of one row (a conversation, or both sides of a preference pair) as
    ``(tokens, weights)``, under the long-row policy.

    Returned unchanged when every one fits in ``max_seq_len`` tokens; else None (``drop``),
    each cut to its first ``max_seq_len`` tokens (``truncate``), or ``error`` raised naming
    ``where`` and the length (``error``).
    """
    longest = max(len(tokens) for tokens, _ in sequences)
    if longest <= max_seq_len:
        return sequences
    if policy == LongRowPolicy.error:
        side = "a side renders" if len(sequences) > 1 else "renders"
        raise error(f"{where}: {side} to {longest} tokens, more than max_seq_len={max_seq_len}; "
                    f"raise max_seq_len, or set long_row_policy to 'truncate' (keep the first "
                    f"max_seq_len tokens) or 'drop' (skip such rows)")
    if policy == LongRowPolicy.drop:
        return None
    return [(tokens[:max_seq_len], weights[:max_seq_len]) for tokens, weights in sequences]


def render_text(tokenizer: Any, segments: Sequence[tuple[str, float]],
                ) -> tuple[list[int], list[float]]:
    """Tokens and weights of a raw-text row (:attr:`ChatRow.text`): each segment tokenized on
    its own with its weight, then the end-of-sequence token with the last segment's weight (so
    the model learns where a completion or document ends). No chat template."""
    tokens: list[int] = []
    weights: list[float] = []
    for text, weight in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += ids
        weights += [float(weight)] * len(ids)
    if tokenizer.eos_token_id is not None:
        tokens.append(int(tokenizer.eos_token_id))
        weights.append(float(segments[-1][1]))
    return tokens, weights


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
                       long_row_policy: LongRowPolicy | str = "drop",
                       ) -> tuple[list[SFTExample], DataStats]:
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
    long_row_policy = check_length_args(max_seq_len, long_row_policy)

    stats = DataStats(rows=len(rows))
    examples: list[SFTExample] = []
    for row in rows:
        if row.text is not None:
            tokens, weights = render_text(tokenizer, row.text)
        else:
            # Rows built by hand skip the loader's checks; validating again costs O(messages).
            _validate_messages(row.messages, row.where)
            tools = _validate_tools(row.fields.get("tools"), row.where)
            try:
                tokens, weights = _render_validated(tokenizer, row.messages, tools)
            except ChatTemplateError as e:
                raise DatasetError(f"{row.where}: {e}") from e
        too_long = len(tokens) > max_seq_len
        fitted = fit_to_length([(tokens, weights)], max_seq_len, long_row_policy, row.where)
        if fitted is None:
            stats.dropped_too_long += 1
            continue
        [(tokens, weights)] = fitted
        stats.truncated += too_long
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
