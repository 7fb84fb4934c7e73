"""Write training/data/sample_pairs.jsonl: the embedding recipe's bundled contrastive pairs.

Each pair is the first user turn of a bundled sample chat (``query``) and the assistant's answer
to it (``positive``, without any ``<think>`` block): a small question-to-answer retrieval task
the tiny models can learn. Deterministic: rerunning writes the same file.

    .venv/bin/python scripts/make_pair_data.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "training" / "data"


def pairs_from_chats(chats_path: Path) -> list[dict[str, str]]:
    pairs, seen = [], set()
    for line in chats_path.read_text().splitlines():
        messages = [m for m in json.loads(line)["messages"] if m["role"] != "system"]
        if len(messages) < 2 or messages[0]["role"] != "user" or \
                messages[1]["role"] != "assistant":
            continue
        query, answer = messages[0].get("content"), messages[1].get("content")
        if not isinstance(query, str) or not isinstance(answer, str):  # tool calls
            continue
        query = query.strip()
        answer = re.sub(r"<think>.*?</think>", "", answer, flags=re.S).strip()
        if query and answer and query not in seen:
            seen.add(query)
            pairs.append({"query": query, "positive": answer})
    return pairs


def main() -> None:
    pairs = pairs_from_chats(DATA / "sample_chats.jsonl")
    out = DATA / "sample_pairs.jsonl"
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"wrote {len(pairs)} pairs to {out}")


if __name__ == "__main__":
    main()
