"""Checkpoint overhead: what periodic STATE saves cost a run, synchronous and async, and resume
latency.

Runs the SFT recipe in child processes on the same model and data:

1. ``dcp_save_interval=0`` (no periodic saves) for N steps;
2. ``dcp_save_interval=1`` with synchronous saves (a save after every step);
3. ``dcp_save_interval=K`` with synchronous saves, and 4. the same with async saves
   (``infra.async_checkpoint=true``, the default): the wall overhead per save is the extra wall
   time over (1) divided by the number of saves (medians of ``--repeats`` alternating runs);
5. a rerun of (4) with 3 more steps: the time from process start to the first resumed step.

Then, in this process, a training client saves every ``--interval`` steps, alternating
synchronous and async rounds: the *stall* of a save is the time training waits for it (a sync
``save_state``; for an async save, its call plus the next ``optim_step`` waiting for the state
copy, as ``TrainingClient.save_stall_s`` counts them), printed as a fraction of the synchronous
one (issue #7's target: at most 10%); the *overhead* is the extra wall time of the round over a
round without saves, per save (for async saves it includes the CPU the background write takes
from the training threads on this 2-core machine).

    .venv/bin/python benchmarks/checkpoint_overhead.py --steps 20 --interval 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
                infra=InfraConfig(storage_root=args.store, num_threads=args.threads,
                                  async_checkpoint=args.async_saves)))
    Path(args.out).write_text(json.dumps({"process_start": args.launched, "main_start": start}))


def _launch(args: argparse.Namespace, log_path: Path, store: Path, interval: int,
            max_steps: int, out: Path, async_saves: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--log-path", str(log_path), "--store", str(store),
           "--interval", str(interval), "--max-steps", str(max_steps), "--out", str(out),
           "--model", args.model, "--threads", str(args.threads),
           "--launched", repr(time.time()), *(["--async-saves"] if async_saves else [])]
    child = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if child.returncode != 0:
        sys.exit(f"child failed:\n{child.stderr[-4000:]}")
    return json.loads(out.read_text())


def measure_stall(args: argparse.Namespace, store: Path, rounds: int = 3) -> dict[str, float]:
    """Median blocking time per save and wall overhead per save, sync vs async, in process."""
    import random

    import torch

    from training.sdk import AdamParams, Datum, ModelInput, ServiceClient

    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    datums = []
    for _ in range(8):
        tokens = [rng.randrange(10, 3000) for _ in range(257)]
        datums.append(Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:])}))
    clients = {mode: ServiceClient(str(store / mode), async_saves=mode == "async")
               .create_training_client(args.model) for mode in ("sync", "async")}

    saved = 0

    def train_round(client, save: bool) -> tuple[float, list[float]]:
        """2 x interval + 1 steps, saving after steps interval and 2 x interval (each save is
        followed by a step: an async save's stall ends at the next optim_step's wait)."""
        nonlocal saved
        stalls, start, stalled = [], time.perf_counter(), client.save_stall_s
        for step in range(1, 2 * args.interval + 2):
            client.forward_backward(datums).result()
            client.optim_step(AdamParams(learning_rate=1e-4)).result()
            if save and step % args.interval == 0:
                # A new name per save, as recipes use (step-N): re-saving a name first deletes
                # the old checkpoint's files, which is not what a run's saves cost.
                saved += 1
                t = time.perf_counter()
                client.save_state(f"save-{saved}")
                if not client.async_saves:
                    stalls.append(time.perf_counter() - t)
        client.wait_for_saves()
        if save and client.async_saves:
            stalls = [(client.save_stall_s - stalled) / 2] * 2
        return time.perf_counter() - start, stalls

    for client in clients.values():  # warm-up: first steps, first save, staging buffers
        train_round(client, save=True)
    stall: dict[str, list[float]] = {"sync": [], "async": []}
    overhead: dict[str, list[float]] = {"sync": [], "async": []}
    for _ in range(rounds):
        for mode, client in clients.items():
            base, _ = train_round(client, save=False)
            wall, blocked = train_round(client, save=True)
            stall[mode] += blocked
            overhead[mode].append((wall - base) / len(blocked))
    return {f"{kind}_{mode}": statistics.median(values[mode])
            for kind, values in (("stall", stall), ("overhead", overhead))
            for mode in ("sync", "async")}


def measure_checksums(args: argparse.Namespace, store: Path, repeats: int = 5) -> dict:
    """What train-state checksums cost: taking them on save (``write_state_checksums``) and
    checking them on load (``verify_state_checksums``), each over a synchronous save and a
    load of the same state (medians of ``repeats``; the state's files are in the page cache,
    as right after a save)."""
    import statistics

    import torch

    from training.sdk import AdamParams, Datum, ModelInput, ServiceClient
    from training.sdk.train_state import verify_state_checksums, write_state_checksums

    torch.set_num_threads(args.threads)
    client = ServiceClient(str(store)).create_training_client(args.model)
    tokens = list(range(10, 267))
    client.forward_backward([Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                                   loss_fn_inputs={"target_tokens": tokens[1:]})]).result()
    client.optim_step(AdamParams(learning_rate=1e-4)).result()  # the state holds Adam moments
    times: dict[str, list[float]] = {"save": [], "take": [], "load": [], "verify": []}
    for i in range(repeats):
        t = time.perf_counter()
        client.save_state(f"bench-{i}").result()
        times["save"].append(time.perf_counter() - t)
        directory = client.store.state_dir(client.job_id, f"bench-{i}")
        t = time.perf_counter()
        write_state_checksums(directory, 0)
        times["take"].append(time.perf_counter() - t)
        t = time.perf_counter()
        verify_state_checksums(directory, "bench")
        times["verify"].append(time.perf_counter() - t)
        t = time.perf_counter()
        client.load_state_with_optimizer(f"bench-{i}").result()
        times["load"].append(time.perf_counter() - t)
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return {"bytes": size, **{k: statistics.median(v) for k, v in times.items()}}


def _rows(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="homefire/tiny-qwen3-10m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs of each recipe-level configuration")
    parser.add_argument("--interval", type=int, default=5,
                        help="dcp_save_interval of the sync/async comparison")
    parser.add_argument("--only-checksums", action="store_true",
                        help="measure only what train-state checksums cost")
    parser.add_argument("--async-saves", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-path", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    # Every configuration writes GBs of checkpoints: remove them, even after a failure.
    tmp = Path(tempfile.mkdtemp(prefix="homefire-ckpt-bench-"))
    try:
        if not args.only_checksums:
            report(args, tmp)
        c = measure_checksums(args, tmp / "checksum-store")
        print(f"train-state checksums ({args.model}, {c['bytes'] / 2**20:.0f} MB state, medians "
              f"of 5): taking them {c['take'] * 1000:.1f} ms = {c['take'] / c['save']:.3f} of a "
              f"save ({c['save'] * 1000:.0f} ms, which includes them); verifying "
              f"{c['verify'] * 1000:.1f} ms = {c['verify'] / c['load']:.3f} of a load "
              f"({c['load'] * 1000:.0f} ms, which includes it) (target: under 0.05)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(args: argparse.Namespace, tmp: Path) -> None:
    """Run every measurement in ``tmp`` and print the figures."""
    store = tmp / "store"
    runs = {"none": (0, False), "sync-every-step": (1, False),
            "sync": (args.interval, False), "async": (args.interval, True)}
    walls: dict[str, list[float]] = {name: [] for name in runs}
    # Whole runs alternate, --repeats times: a run's wall time moves by ~0.5 s from one run
    # to the next on this machine, as much as its few saves cost, so one run of each says little.
    for repeat in range(args.repeats):
        for name, (interval, async_saves) in runs.items():
            if name == "sync-every-step" and repeat:
                continue  # its saves dwarf the noise
            log = tmp / f"{name}-{repeat}"
            _launch(args, log, store, interval, args.steps, tmp / f"out-{name}.json",
                    async_saves)
            rows = _rows(log)
            # Steps 2..N (the first step pays one-off warm-up costs), and the final step's
            # periodic save is excluded: its row is written before that save starts.
            walls[name].append(rows[-1]["time"] - rows[0]["time"])
    wall = {name: statistics.median(values) for name, values in walls.items()}
    steps = args.steps - 1
    saves = len([s for s in range(1, args.steps) if s % args.interval == 0])
    stall = {name: (wall[name] - wall["none"]) / saves for name in ("sync", "async")}
    every = (wall["sync-every-step"] - wall["none"]) / steps

    resumed = _launch(args, tmp / "async-0", store, args.interval, args.steps + 3,
                      tmp / "out-resume.json", async_saves=True)
    rows = _rows(tmp / "async-0")
    first_resumed = next(r for r in rows if r["step"] == args.steps + 1)
    to_main = resumed["main_start"] - resumed["process_start"]
    to_first_step = first_resumed["time"] - resumed["process_start"]

    print(f"Checkpoint overhead: {args.model}, batch 8, {args.threads} threads, "
          f"{args.steps} steps")
    print(f"step time, no saves:              {wall['none'] / steps:.3f} s")
    print(f"step time, sync save every step:  {wall['sync-every-step'] / steps:.3f} s "
          f"({wall['sync-every-step'] / wall['none']:.2f}x; ~{every:.3f} s per save)")
    print(f"recipe wall overhead per save, every {args.interval} steps (medians of "
          f"{args.repeats} runs): sync {stall['sync']:.3f} s, async {stall['async']:.3f} s")
    print(f"  (async / sync: {stall['async'] / stall['sync']:.2f}; run walls: "
          + ", ".join(f"{name} {' '.join(f'{w:.2f}' for w in values)} s"
                      for name, values in walls.items() if name != "sync-every-step") + ")")
    print(f"resume: process start -> main() {to_main:.2f} s (imports); "
          f"-> first resumed step done {to_first_step:.2f} s")

    figures = measure_stall(args, tmp / "stall-store")
    print(f"In process, a save every {args.interval} steps (batch 8 x 256), medians:")
    print(f"  training blocked per save: sync {figures['stall_sync']:.3f} s, "
          f"async {figures['stall_async']:.3f} s -> "
          f"{figures['stall_async'] / figures['stall_sync']:.3f} (target <= 0.10)")
    print(f"  wall overhead per save:    sync {figures['overhead_sync']:.3f} s, "
          f"async {figures['overhead_async']:.3f} s -> "
          f"{figures['overhead_async'] / figures['overhead_sync']:.2f}")


if __name__ == "__main__":
    main()
