"""Trainer server figures: memory per LoRA adapter on one base, and latency over the wire.

1. Memory: in a child process per setting, 1, 4 and 8 LoRA training clients of ``--model`` made
   the way the server makes them (``load_shared_base``: one copy of the base weights), each
   after one optimizer step, and the same with a private copy of the base per client (what each
   client cost before): the bytes of the distinct tensors they hold (weights, gradients, AdamW
   moments) and the RSS growth. Each extra adapter's cost is printed as a fraction of the base
   weights' bytes (goal: under 5% with sharing), with what it holds beyond its own weights and
   AdamW moments (what sharing the base can save), and the same
   fraction by arithmetic at Qwen3-8B's shape.
2. Latency: one ``forward_backward`` + ``optim_step`` of a batch of 8 short chats, median of
   ``--steps`` steps, through the official ``tinker`` client against a trainer server on
   127.0.0.1 (``scripts/trainer_server.py`` in its own process), over the same calls on an
   in-process training client, alternating round by round (goal: at most 1.15x); waiting on
   each call, and pipelined as Tinker recommends (optim_step submitted before waiting).

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


def memory_child(model: str, store: str, adapters: int, shared: bool, rank: int) -> dict:
    """Build ``adapters`` LoRA clients as the server does, take one optimizer step on each, and
    return the RSS growth and the bytes of distinct tensors they hold (weights, gradients and
    AdamW moments)."""
    import gc

    import torch

    from training.sdk import AdamParams, Datum, ModelInput, ServiceClient
    from training.sdk import models as models_module

    torch.set_num_threads(1)
    if not shared:  # what every client cost before: a private copy of the base each
        models_module.load_shared_base = _private_base
        import training.sdk.service_client as service_module
        service_module.load_shared_base = _private_base
    ServiceClient(store, device="cpu", mixed_precision="no")  # imports, store, tiny model files
    gc.collect()
    baseline = _rss_mb()
    clients = []
    datum = Datum(model_input=ModelInput.from_ints(list(range(5, 69))),
                  loss_fn_inputs={"target_tokens": list(range(6, 70))})
    for _ in range(adapters):
        client = ServiceClient(store, device="cpu", mixed_precision="no") \
            .create_lora_training_client(model, rank=rank, seed=0)
        client.forward_backward([datum]).result()
        client.optim_step(AdamParams(learning_rate=1e-4)).result()
        clients.append(client)
    gc.collect()
    storages: dict[int, int] = {}
    for client in clients:
        tensors = [*client.model.parameters(), *client.model.buffers()]
        for state in client._optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    first = clients[0].model
    base_bytes = sum(p.numel() * p.element_size() for n, p in first.named_parameters()
                     if "lora_" not in n)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in first.named_parameters()
                        if "lora_" in n)
    return {"rss_mb": _rss_mb() - baseline, "tensor_mb": sum(storages.values()) / 2**20,
            "base_mb": base_bytes / 2**20, "adapter_mb": adapter_bytes / 2**20}


def _private_base(name, store=None, dtype=None, device="cpu"):
    import torch

    from training.sdk.models import load_causal_lm

    return load_causal_lm(name, store, dtype=dtype or torch.float32, device=device)


def memory(args: argparse.Namespace, store: str) -> dict[tuple[bool, int], dict]:
    figures = {}
    for shared in (True, False) if not args.shared_only else (True,):
        for n in (1, 4, 8):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(n), "--model", args.model,
                 "--rank", str(args.rank), "--store", store,
                 *(["--shared"] if shared else [])],
                capture_output=True, text=True, cwd=REPO, check=False)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            figures[(shared, n)] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def latency(args: argparse.Namespace, store: str) -> dict[str, list[float]]:
    """Step times in process and through a trainer server started as its own process (as a
    user runs it: the client does not share the server's interpreter)."""
    import socket
    import urllib.request

    import tinker
    import torch

    from training.sdk import ServiceClient
    from training.sdk.tiny_model import SAMPLE_CHATS_PATH
    from training.utils.data import build_sft_examples, example_to_datum, load_chat_rows

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TINKER_API_KEY", "tml-bench")
    os.environ["TINKER_TELEMETRY"] = "0"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "trainer_server.py"), "--base-model",
         args.latency_model, "--storage-root", store, "--port", str(port), "--device", "cpu",
         "--mixed-precision", "no", "--log-level", "warning"],
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/healthz",
                                            timeout=2):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the trainer server did not start") from None
                time.sleep(0.2)
        remote = tinker.ServiceClient(base_url=f"http://127.0.0.1:{port}") \
            .create_lora_training_client(args.latency_model, rank=16, seed=0).result()
        local = ServiceClient(store, device="cpu", mixed_precision="no") \
            .create_lora_training_client(args.latency_model, rank=16, seed=0)
        rows = load_chat_rows(str(SAMPLE_CHATS_PATH))[:8]
        examples, _ = build_sft_examples(rows, local.get_tokenizer(), 512, "drop")
        ours = [example_to_datum(e) for e in examples]
        theirs = [tinker.Datum(model_input=tinker.ModelInput.from_ints(d.model_input.to_ints()),
                               loss_fn_inputs={k: v.tolist() for k, v in
                                               d.loss_fn_inputs.items()}) for d in ours]
        times: dict[str, list[float]] = {}
        for step in range(args.steps + 2):
            for name, client, data in (("in process", local, ours),
                                       ("over the wire", remote, theirs)):
                started = time.perf_counter()
                client.forward_backward(data, "cross_entropy").result()
                client.optim_step(tinker.AdamParams(learning_rate=1e-4)).result()
                middle = time.perf_counter()
                # Tinker's recommended form: submit the optimizer step before waiting.
                fwd_bwd = client.forward_backward(data, "cross_entropy")
                optim = client.optim_step(tinker.AdamParams(learning_rate=1e-4))
                fwd_bwd.result()
                optim.result()
                if step >= 2:  # two warm-up steps
                    times.setdefault(f"{name}, waiting on each", []).append(middle - started)
                    times.setdefault(f"{name}, pipelined", []).append(
                        time.perf_counter() - middle)
        # This process's CPU over wire-only steps (no in-process step whose idle OpenMP
        # threads would spin here): the official client's own cost per step, in its asyncio
        # thread (httpx, pydantic, protobuf), while the server computes.
        cpu_started = time.process_time()
        for _ in range(args.steps):
            remote.forward_backward(theirs, "cross_entropy").result()
            remote.optim_step(tinker.AdamParams(learning_rate=1e-4)).result()
        times["over the wire, client cpu"] = [(time.process_time() - cpu_started) / args.steps]
        return times
    finally:
        server.terminate()
        server.wait(20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="homefire/tiny-qwen3-10m",
                        help="base model of the memory figures")
    parser.add_argument("--latency-model", default="homefire/tiny-qwen3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the memory figures")
    parser.add_argument("--only", choices=["memory", "latency"], help="run one part")
    parser.add_argument("--shared-only", action="store_true",
                        help="memory with the shared base only (a private base per adapter "
                             "needs 8 copies of it: too much for a real size on a small machine)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shared", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.model, args.store, args.memory_child, args.shared,
                                      args.rank)))
        return 0
    with tempfile.TemporaryDirectory(prefix="homefire-bench-") as store:
        figures = memory(args, store) if args.only != "latency" else None
        times = latency(args, store) if args.only != "memory" else None
    if figures is not None:
        print_memory(args, figures)
    if times is not None:
        medians = {k: statistics.median(v) for k, v in times.items()}
        print(f"latency: forward_backward + optim_step of 8 chats on {args.latency_model}, "
              f"median of {args.steps} (goal: over the wire at most 1.15x):")
        for form in ("waiting on each", "pipelined"):
            local_s = medians[f"in process, {form}"]
            wire_s = medians[f"over the wire, {form}"]
            print(f"  {form:16s}: in process {local_s * 1000:.1f} ms, over the wire "
                  f"{wire_s * 1000:.1f} ms: {wire_s / local_s:.2f}x")
        print(f"  the official client's own CPU per step over the wire: "
              f"{medians['over the wire, client cpu'] * 1000:.1f} ms (waiting on each)")
    return 0


def print_memory(args: argparse.Namespace, figures: dict[tuple[bool, int], dict]) -> None:
    base = figures[(True, 1)]["base_mb"]
    adapter = figures[(True, 1)]["adapter_mb"]
    print(f"memory: {args.model}, LoRA rank {args.rank}: base weights {base:.1f} MB, one "
          f"adapter {adapter:.2f} MB ({adapter / base:.3f} of the base; with its AdamW moments "
          f"{3 * adapter:.2f} MB)")
    for shared in (True, False):
        if (shared, 1) not in figures:
            continue
        label = "shared base  " if shared else "private bases"
        tensor = {n: figures[(shared, n)]["tensor_mb"] for n in (1, 4, 8)}
        rss = {n: figures[(shared, n)]["rss_mb"] for n in (1, 4, 8)}
        extra = (tensor[8] - tensor[1]) / 7
        print(f"  {label}: tensors held with 1 / 4 / 8 adapters {tensor[1]:.1f} / "
              f"{tensor[4]:.1f} / {tensor[8]:.1f} MB (RSS growth {rss[1]:.0f} / {rss[4]:.0f} / "
              f"{rss[8]:.0f} MB); each extra adapter {extra:.2f} MB = {extra / base:.3f} of "
              f"the base, {extra - 3 * adapter:+.2f} MB beyond its own weights and AdamW moments")
    # The adapter's own state (weights and two AdamW moments: 3x its parameters; gradients,
    # one more 1x, live only during a step) is set by rank and shape: 2r/d of each adapted
    # matrix. At a tiny model's d that is a large
    # fraction; at real widths it is small. The same arithmetic for Qwen3-8B's shape:
    print(f"  by arithmetic, rank {args.rank} on every attention and MLP projection of "
          f"Qwen3-8B's shape: {_lora_state_fraction(args.rank, 3):.3f} of its fp32 base weights "
          f"per adapter ({_lora_state_fraction(args.rank, 4):.3f} during a step; goal: under "
          f"0.05)")


def _lora_state_fraction(rank: int, copies: int, hidden: int = 4096, layers: int = 36, heads: int = 32,
                         kv_heads: int = 8, head_dim: int = 128, intermediate: int = 12288,
                         vocab: int = 151936) -> float:
    """A LoRA adapter's trainable state (``copies`` x its parameters) over the base's
    parameters, for a Qwen3 shape (defaults: Qwen3-8B's config.json)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    projections = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden),
                   (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    base = layers * sum(i * o for i, o in projections) + 2 * vocab * hidden
    adapter = layers * sum(rank * (i + o) for i, o in projections)
    return copies * adapter / base


if __name__ == "__main__":
    sys.exit(main())
