"""Checkpoint overhead: step time with a DCP save every step vs no saves, and resume latency.

Runs the SFT recipe three times in child processes on the same model and data:

1. ``dcp_save_interval=0`` (no periodic saves) for N steps;
2. ``dcp_save_interval=1`` (a STATE save after every step) for N steps;
3. a rerun of (2) with N more steps: the time from process start to the first resumed step,
   split into imports + model load and checkpoint restore.

Prints mean wall time per step for (1) and (2), their ratio, the save cost per step, and the
resume latency.

    .venv/bin/python benchmarks/checkpoint_overhead.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_child(args: argparse.Namespace) -> None:
    from training.recipes.sft_loop import Config, main
    from training.utils import InfraConfig

    start = time.time()
    main(Config(log_path=args.log_path, base_model=args.model, batch_size=8, epochs=100,
                max_steps=args.max_steps, dcp_save_interval=args.interval,
                infra=InfraConfig(storage_root=args.store, num_threads=args.threads)))
    Path(args.out).write_text(json.dumps({"process_start": args.launched, "main_start": start}))


def _launch(args: argparse.Namespace, log_path: Path, store: Path, interval: int,
            max_steps: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--log-path", str(log_path), "--store", str(store),
           "--interval", str(interval), "--max-steps", str(max_steps), "--out", str(out),
           "--model", args.model, "--threads", str(args.threads),
           "--launched", repr(time.time())]
    child = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if child.returncode != 0:
        sys.exit(f"child failed:\n{child.stderr[-4000:]}")
    return json.loads(out.read_text())


def _rows(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="homefire/tiny-qwen3-10m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-path", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="homefire-ckpt-bench-"))
    store = tmp / "store"
    # Steps 2..N: the first step pays one-off warm-up costs in both runs.
    per_step = {}
    for interval in (0, 1):
        log = tmp / f"interval-{interval}"
        _launch(args, log, store, interval, args.steps, tmp / f"out-{interval}.json")
        rows = _rows(log)
        per_step[interval] = (rows[-1]["time"] - rows[0]["time"]) / (len(rows) - 1)

    resumed = _launch(args, tmp / "interval-1", store, 1, args.steps + 3, tmp / "out-resume.json")
    rows = _rows(tmp / "interval-1")
    first_resumed = next(r for r in rows if r["step"] == args.steps + 1)
    to_main = resumed["main_start"] - resumed["process_start"]
    to_first_step = first_resumed["time"] - resumed["process_start"]

    print(f"Checkpoint overhead: {args.model}, batch 8, {args.threads} threads, "
          f"{args.steps} steps")
    print(f"step time, no saves:           {per_step[0]:.3f} s")
    print(f"step time, STATE save per step: {per_step[1]:.3f} s")
    print(f"ratio (save every step / none): {per_step[1] / per_step[0]:.2f}x "
          f"(save cost ~{per_step[1] - per_step[0]:.3f} s per save)")
    print(f"resume: process start -> main() {to_main:.2f} s (imports); "
          f"-> first resumed step done {to_first_step:.2f} s")


if __name__ == "__main__":
    main()
