"""Generate the bundled RL toy task: ``training/data/sample_rl_prompts.jsonl``.

The task: "write words that start with the letter s", asked in many phrasings. Each row carries
the ``letter`` and a ``pattern`` matching (case-insensitively) a word that starts with it, plus
the spaces before it; the built-in ``regex_coverage`` reward scores a completion by the fraction
of its characters inside such words. The tiny models start from random weights and emit
near-random subword tokens, of which a few percent happen to start an s-word: the reward is dense
from the first step (almost every group has some variance) and the policy raises it by favouring
those tokens. One letter, because a ~1M-parameter model does not learn within minutes to
condition on which letter is asked (with six letters it hedged across them and plateaued near
1/6). It is a smoke test of the RL machinery, not a benchmark.

Deterministic (fixed seed and lists): the script writes the file byte-identically every run::

    python scripts/make_rl_prompts.py          # rewrite the file
    python scripts/make_rl_prompts.py --check  # exit 1 if the bundled file is stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "training" / "data"
SAMPLE_RL_PROMPTS_FILE = DATA_DIR / "sample_rl_prompts.jsonl"

SEED = 20251125
# 's' starts many subword tokens of the tiny models' vocabulary: a random policy scores above 0.
LETTERS = ("s",)
TEMPLATES = (
    "Write {n} words that start with the letter {L}.",
    "List {n} words beginning with '{l}'.",
    "Say {n} words starting with {l}.",
    "Give me {n} {L} words.",
)
COUNTS = range(3, 33)  # 30 counts x 4 templates = 120 prompts


def pattern_for(letter: str) -> str:
    """A word starting with ``letter`` (any case) and the whitespace before it."""
    return rf"(?i)\s*\b{letter}\w*"


def render_output() -> str:
    rows = [{"messages": [{"role": "user",
                           "content": template.format(n=n, L=letter.upper(), l=letter)}],
             "letter": letter, "pattern": pattern_for(letter)}
            for letter in LETTERS for template in TEMPLATES for n in COUNTS]
    random.Random(SEED).shuffle(rows)
    return "".join(json.dumps(row) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the bundled file differs from what this "
                             "script generates")
    args = parser.parse_args(argv)
    data = render_output().encode("utf-8")
    if args.check:
        if not SAMPLE_RL_PROMPTS_FILE.exists() or SAMPLE_RL_PROMPTS_FILE.read_bytes() != data:
            print(f"stale: {SAMPLE_RL_PROMPTS_FILE} (run python scripts/make_rl_prompts.py)",
                  file=sys.stderr)
            return 1
        return 0
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    SAMPLE_RL_PROMPTS_FILE.write_bytes(data)  # bytes: identical on every OS
    print(f"wrote {SAMPLE_RL_PROMPTS_FILE} ({len(data.splitlines())} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
