"""Trainer server figures: memory per LoRA adapter on one base, and latency over the wire.

1. Memory: in a child process per setting, the resident memory (RSS) after creating 1, 4 and 8
   LoRA training clients of ``--model`` the way the server does (``load_shared_base``: one copy
   of the base weights), and the same with a private copy of the base per client (what each
   client cost before). Each extra adapter's cost is printed as a fraction of the base weights'
   bytes (goal: under 5% with sharing).
2. Latency: one ``forward_backward`` + ``optim_step`` of a batch of 8 short chats, median of
   ``--steps`` steps, through the official ``tinker`` client against a trainer server on
   127.0.0.1 (in this process, uvicorn in a thread), over the same calls on an in-process
   training client, alternating round by round (goal: at most 1.15x).

    .venv/bin/python benchmarks/trainer_server.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_child(model: str, store: str, adapters: int, shared: bool) -> dict:
    import gc

    import torch

    from training.sdk.lora import apply_lora
    from training.sdk.models import load_causal_lm, load_shared_base
    from training.sdk.store import CheckpointStore

    torch.set_num_threads(1)
    store_obj = CheckpointStore(store)
    load_causal_lm(model, store_obj)  # builds/loads once: files cached, allocator warmed
    gc.collect()
    baseline = _rss_mb()
    models = []
    for _ in range(adapters):
        base = (load_shared_base(model, store_obj) if shared
                else load_causal_lm(model, store_obj))
        base.requires_grad_(False)
        models.append(apply_lora(base, 16))
    gc.collect()
    base_bytes = sum(p.numel() * p.element_size()
                     for n, p in models[0].named_parameters() if "lora_" not in n)
    adapter_bytes = sum(p.numel() * p.element_size()
                        for n, p in models[0].named_parameters() if "lora_" in n)
    return {"rss_mb": _rss_mb() - baseline, "base_mb": base_bytes / 2**20,
            "adapter_mb": adapter_bytes / 2**20}


def memory(args: argparse.Namespace, store: str) -> dict[tuple[bool, int], dict]:
    figures = {}
    for shared in (True, False):
        for n in (1, 4, 8):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(n), "--model", args.model,
                 "--store", store, *(["--shared"] if shared else [])],
                capture_output=True, text=True, cwd=REPO, check=False)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            figures[(shared, n)] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def latency(args: argparse.Namespace, store: str) -> dict[str, list[float]]:
    import tinker
    import torch

    from training.sdk import ServiceClient
    from training.sdk.tiny_model import SAMPLE_CHATS_PATH
    from training.utils.data import build_sft_examples, example_to_datum, load_chat_rows

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TrainerServerThread  # the same in-thread server the tests use

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TINKER_API_KEY", "tml-bench")
    os.environ["TINKER_TELEMETRY"] = "0"
    server = TrainerServerThread(store, base_models=[args.latency_model])
    try:
        remote = tinker.ServiceClient(base_url=server.url).create_lora_training_client(
            args.latency_model, rank=16, seed=0).result()
        local = ServiceClient(store, device="cpu", mixed_precision="no") \
            .create_lora_training_client(args.latency_model, rank=16, seed=0)
        rows = load_chat_rows(str(SAMPLE_CHATS_PATH))[:8]
        examples, _ = build_sft_examples(rows, local.get_tokenizer(), 512, "drop")
        ours = [example_to_datum(e) for e in examples]
        theirs = [tinker.Datum(model_input=tinker.ModelInput.from_ints(d.model_input.to_ints()),
                               loss_fn_inputs={k: v.tolist() for k, v in
                                               d.loss_fn_inputs.items()}) for d in ours]
        times: dict[str, list[float]] = {"in process": [], "over the wire": []}
        for step in range(args.steps + 2):
            for name, client, data in (("in process", local, ours),
                                       ("over the wire", remote, theirs)):
                started = time.perf_counter()
                client.forward_backward(data, "cross_entropy").result()
                client.optim_step(tinker.AdamParams(learning_rate=1e-4)).result()
                if step >= 2:  # two warm-up steps
                    times[name].append(time.perf_counter() - started)
        return times
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="homefire/tiny-qwen3-10m",
                        help="base model of the memory figures")
    parser.add_argument("--latency-model", default="homefire/tiny-qwen3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shared", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.model, args.store, args.memory_child, args.shared)))
        return 0
    with tempfile.TemporaryDirectory(prefix="homefire-bench-") as store:
        figures = memory(args, store)
        times = latency(args, store)
    base = figures[(True, 1)]["base_mb"]
    print(f"memory: {args.model}, LoRA rank 16 (adapter {figures[(True, 1)]['adapter_mb']:.2f} "
          f"MB of params), base weights {base:.1f} MB; RSS growth over the loaded process:")
    for shared in (True, False):
        label = "shared base " if shared else "private bases"
        rss = {n: figures[(shared, n)]["rss_mb"] for n in (1, 4, 8)}
        extra = (rss[8] - rss[1]) / 7
        print(f"  {label}: 1 adapter {rss[1]:.1f} MB, 4 {rss[4]:.1f} MB, 8 {rss[8]:.1f} MB; "
              f"each extra adapter {extra:.2f} MB = {extra / base:.3f} of the base")
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"latency: forward_backward + optim_step of 8 chats on {args.latency_model}, median "
          f"of {args.steps}: in process {medians['in process'] * 1000:.1f} ms, over the wire "
          f"{medians['over the wire'] * 1000:.1f} ms: "
          f"{medians['over the wire'] / medians['in process']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
