"""Contrastive pairs for the embedding recipe: rows, validation, tokenization, the loss.

A row is a JSON object with a ``query`` and its ``positive`` text, and optionally a ``negative``
(a hard negative: a text that looks related but is not a match). ``anchor`` is accepted for
``query`` (the sentence-transformers name). Any source :func:`training.utils.data.read_records`
reads works (JSONL, parquet, ``datasets``).

The loss is InfoNCE with in-batch negatives: every query is scored against every positive (and
hard negative) of its batch by cosine similarity over ``temperature``, and the cross-entropy of
picking its own positive is averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.sdk import Datum, ModelInput
from training.utils.data import DatasetError, read_records

SAMPLE_PAIRS_PATH: Path = Path(__file__).resolve().parent.parent / "data" / "sample_pairs.jsonl"
"""Bundled pairs: 319 questions from the sample chats and their answers
(``scripts/make_pair_data.py``)."""

_FIELDS = ("query", "positive", "negative")


@dataclass
class PairExample:
    """One tokenized pair (token ids, each ending with the end-of-sequence token)."""

    query: list[int]
    positive: list[int]
    negative: list[int] | None = None


@dataclass
class PairStats:
    rows: int = 0
    truncated: int = 0
    with_negative: int = 0

    def summary(self) -> str:
        return (f"{self.rows} pairs, {self.with_negative} with a hard negative, "
                f"{self.truncated} texts truncated to max_seq_len")


def load_pairs(source: str, tokenizer: Any, max_seq_len: int, split: str = "train",
               ) -> tuple[list[PairExample], PairStats]:
    """Read, validate and tokenize the pairs of ``source``.

    Each text is tokenized without special tokens, cut to ``max_seq_len - 1`` tokens (counted)
    and ended with the tokenizer's end-of-sequence token, whose final hidden state then has
    seen the whole text (``pooling="last"``).

    Raises:
        DatasetError: a row is not an object, lacks ``query`` / ``positive``, has a field that
            is not a non-empty string, or an unknown field; or the source has no rows. The
            message names ``file:line`` and the field.
    """
    if max_seq_len < 2:
        raise DatasetError(f"max_seq_len={max_seq_len} leaves no room for a text")
    eos = tokenizer.eos_token_id
    examples: list[PairExample] = []
    stats = PairStats()
    for record, _, where in read_records(source, split):
        texts = _validate(record, where)
        tokenized = {}
        for name, text in texts.items():
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) > max_seq_len - 1:
                ids = ids[:max_seq_len - 1]
                stats.truncated += 1
            tokenized[name] = ids + ([eos] if eos is not None else [])
        examples.append(PairExample(**tokenized))
        stats.rows += 1
        stats.with_negative += "negative" in tokenized
    if not examples:
        raise DatasetError(f"{source}: has no rows; expected one JSON object per row with "
                           f"'query' and 'positive' (and optionally 'negative') texts")
    return examples, stats


def _validate(record: Any, where: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: a row must be a JSON object with 'query' and 'positive', "
                           f"got {type(record).__name__}")
    row = dict(record)
    if "anchor" in row and "query" not in row:
        row["query"] = row.pop("anchor")
    unknown = sorted(set(row) - set(_FIELDS))
    if unknown:
        raise DatasetError(f"{where}: unknown field(s) {unknown}; a pair has 'query' (or "
                           f"'anchor'), 'positive' and optionally 'negative'")
    for name in ("query", "positive"):
        if name not in row:
            raise DatasetError(f"{where}: row has no {name!r} field (its fields: "
                               f"{', '.join(map(repr, record)) or 'none'})")
    for name, value in row.items():
        if not isinstance(value, str) or not value.strip():
            raise DatasetError(f"{where}: {name!r} must be a non-empty string, got {value!r}")
    return row


def pair_datums(batch: Sequence[PairExample]) -> list[Datum]:
    """The datums of a batch, in the order :func:`info_nce` reads them: every query, then
    every positive, then every hard negative."""
    texts = ([p.query for p in batch] + [p.positive for p in batch]
             + [p.negative for p in batch if p.negative is not None])
    return [Datum(model_input=ModelInput.from_ints(ids)) for ids in texts]


def info_nce(embeddings: Sequence[torch.Tensor], batch_size: int, temperature: float,
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE over in-batch negatives of :func:`pair_datums`' embeddings.

    Returns the mean loss over the batch's queries and its metrics: ``loss``, ``accuracy`` (fraction of
    queries whose own positive scores highest), ``positive_similarity`` and
    ``negative_similarity`` (mean cosine of matching and of other pairs).
    """
    stacked = F.normalize(torch.stack(list(embeddings)).float(), dim=-1)
    queries, candidates = stacked[:batch_size], stacked[batch_size:]
    similarity = queries @ candidates.T
    labels = torch.arange(batch_size, device=similarity.device)
    loss = F.cross_entropy(similarity / temperature, labels)
    with torch.no_grad():
        positives = similarity[labels, labels]
        others = similarity.clone()
        others[labels, labels] = float("nan")
        metrics = {"loss": float(loss),
                   "accuracy": float((similarity.argmax(dim=1) == labels).float().mean()),
                   "positive_similarity": float(positives.mean()),
                   "negative_similarity": float(others.nanmean()) if others.numel() > batch_size
                   else 0.0}
    return loss, metrics


def pair_loss(datums: Sequence[Datum], embeddings: Sequence[torch.Tensor], *, batch_size: int,
              temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`info_nce` as a ``forward_backward_custom`` loss function (bind ``batch_size``
    and ``temperature`` with ``functools.partial``)."""
    return info_nce(embeddings, batch_size, temperature)
