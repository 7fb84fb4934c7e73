"""SFT throughput: our sft_loop against TRL's SFTTrainer and a minimal packed loop, side by side.

Each contender runs in its own child process (fresh memory, same thread count), alternating in
rounds, on the same model, data, max length and batch of 8 sequences with assistant-only loss:

- ``ours``: ``training.recipes.sft_loop.main`` with resumable checkpoints on
  (``dcp_save_interval=10``, async saves: the default), per-document boundaries kept (each
  step's conversations packed in one row, attention per document, position resets);
- ``ours-compiled``: the same with ``infra.compile=true`` (torch.compile; the one-off compile
  falls in the untimed warm-up steps);
- ``ours-unchunked``: ``ours`` scoring the whole batch's logits at once, as before large
  vocabularies were chunked (``training.sdk.packing.MAX_LOGITS``): the memory that saves;
- ``trl-default``: TRL ``SFTTrainer`` with its defaults (gradient checkpointing on);
- ``trl-best``: TRL with gradient checkpointing off (its best CPU setting here);
- ``ceiling``: a minimal loop on pre-tokenized, packed 8 x max_len rows, bf16 autocast, fused
  AdamW; it ignores document boundaries and does no checkpointing: the practical ceiling.

Prints real (non-pad) tokens/s, s/step and peak RSS per contender (during the timed steps, and
over the whole process), and the ratios. ``--model`` takes a built-in model, a real-shape preset
built offline at random init (``smollm2-135m``, ``qwen3-0.6b``) or a local directory. TRL is a
benchmark-only dependency (``pip install trl``).

``--data-shape`` picks the conversations (built from the bundled chats, merged to a target
length): ``mixed`` (default) spreads lengths uniformly over 10-100% of max_len, as in real chat
data where short and long conversations share a batch; ``long`` keeps every conversation at
60-100% of max_len (little padding for anyone: the hardest case for packing).

    .venv/bin/python benchmarks/sft_throughput.py --steps 20 --warmup 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"smollm2-135m": "homefire/smollm2-135m-shape",
           "qwen3-0.6b": "homefire/qwen3-0.6b-shape"}
"""Short names of the real-shape models built offline at random init (training/sdk/tiny_model.py)."""
CONTENDERS = ("ours", "ours-compiled", "ours-unchunked", "trl-default", "trl-best", "ceiling")
COMPILE_EXTRA_WARMUP = 8
DATA_SHAPES = {"mixed": (0.1, 1.0), "long": (0.6, 1.0)}
"""Conversation lengths as a uniform range of fractions of max_len."""


# ---------------------------------------------------------------------------- data
def make_data(path: Path, tokenizer, max_len: int, rows: int = 400,
              shape: str = "mixed") -> None:
    """Multi-turn chats of lengths spread over ``DATA_SHAPES[shape]`` of max_len, built from the
    bundled sample chats.

    The bundled chats are short (~44 tokens); benchmarks on them alone would measure per-step
    overhead, not training throughput, so consecutive conversations are merged up to a target
    length drawn (deterministically) from the shape's range.
    """
    low, high = DATA_SHAPES[shape]
    from training.sdk.tiny_model import SAMPLE_CHATS_PATH
    from training.utils.data import render_chat

    source = [json.loads(line)["messages"] for line in SAMPLE_CHATS_PATH.read_text().splitlines()]
    source = [m for m in source if all(msg["role"] in ("user", "assistant") for msg in m)
              and not any(msg.get("weight") is not None for msg in m)]
    out, i = [], 0
    while len(out) < rows:
        messages: list[dict] = []
        target = max_len * (low + (high - low) * ((len(out) * 7919) % 100) / 100)
        while True:
            candidate = messages + source[i % len(source)]
            i += 1
            if len(render_chat(tokenizer, candidate)[0]) > min(target, max_len - 1):
                break
            messages = candidate
        if messages:
            out.append({"messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))


def model_name(model: str) -> str:
    """``--model`` as the recipes take it: a preset's built-in name, else as given."""
    return PRESETS.get(model, model)


def model_dir(model: str) -> str:
    """The local Hugging Face directory of ``--model``: a built-in model (built on first use)
    or a directory given as is."""
    from training.sdk.tiny_model import ensure_tiny_model, is_tiny_model

    name = model_name(model)
    if is_tiny_model(name):
        return str(ensure_tiny_model(name))
    if (Path(name) / "config.json").is_file():
        return name
    sys.exit(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}), a built-in model "
             f"nor a local Hugging Face model directory (with config.json)")


def _gpu_attention() -> str:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 peak of the cards MFU is computed for (by name), in TFLOP/s."""


def parameter_count(model: str) -> int:
    """Parameters of ``--model`` (a tied embedding counted once: it is the output layer's
    matmul), from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir(model)))
    return sum(p.numel() for p in net.parameters())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """This process's resident memory every 10 ms, in a thread: the peak of a time window
    (the timed steps) apart from what came before or after (loading, the final checkpoint)."""

    def __init__(self) -> None:
        import threading

        self.samples: list[tuple[float, float]] = []
        self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open("/proc/self/statm") as statm:
            while not self._stop.wait(0.01):
                statm.seek(0)
                self.samples.append((time.time(), int(statm.read().split()[1]) * self._page_mb))

    def peak_mb(self, start: float, end: float) -> float:
        self._stop.set()
        self._thread.join()
        return max((mb for t, mb in self.samples if start <= t <= end), default=float("nan"))


# ---------------------------------------------------------------------------- contenders
def run_ours(args: argparse.Namespace, compile: bool = False) -> dict:
    from training.recipes.sft_loop import Config, main
    from training.utils import InfraConfig
    from training.utils.metrics import read_metrics

    # torch.compile compiles at the first step and recompiles once or twice as packed shapes
    # vary (a minute or more each on 2 cores): steady-state throughput needs a longer warm-up.
    warmup = args.warmup + (COMPILE_EXTRA_WARMUP if compile else 0)
    if args.contender == "ours-unchunked":  # the whole batch's logits at once (before chunking)
        from training.sdk import training_client

        training_client.MAX_LOGITS = None
    sampler = RssSampler()
    with tempfile.TemporaryDirectory() as tmp:
        main(Config(log_path=f"{tmp}/run", base_model=model_name(args.model), dataset=args.data,
                    batch_size=args.batch_size, max_seq_len=args.max_len,
                    long_row_policy="truncate", epochs=100, max_steps=warmup + args.steps,
                    learning_rate=1e-4, dcp_save_interval=10,
                    infra=InfraConfig(storage_root=f"{tmp}/store", num_threads=args.threads,
                                      compile=compile, device=args.device)))
        rows = read_metrics(f"{tmp}/run")
    timed = rows[warmup:]
    seconds = timed[-1]["time"] - rows[warmup - 1]["time"]
    tokens = sum(r["num_tokens"] for r in timed)
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / len(timed),
            "warmup_s": rows[warmup - 1]["time"] - rows[0]["time"],
            "train_peak_mb": sampler.peak_mb(rows[warmup - 1]["time"], timed[-1]["time"])}


def run_trl(args: argparse.Namespace, gradient_checkpointing: bool | None) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(args.threads)
    directory = model_dir(args.model)
    step_times: list[float] = []
    tokens_per_step: list[int] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *_, **__):
            if args.device != "cpu":
                torch.cuda.synchronize()  # the step's kernels, not just their launch
            step_times.append(time.perf_counter())
            wall_times.append(time.time())

    wall_times: list[float] = []
    sampler = RssSampler()

    with tempfile.TemporaryDirectory() as tmp:
        extra: dict = {} if gradient_checkpointing is None else {
            "gradient_checkpointing": gradient_checkpointing}
        if args.device != "cpu" and gradient_checkpointing is False:
            # TRL's best GPU setting: padding-free batches (one row, position ids restarting
            # per conversation) with flash attention where installed, else SDPA.
            extra["padding_free"] = True
            extra["model_init_kwargs"] = {"attn_implementation": _gpu_attention()}
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.batch_size,
                           max_length=args.max_len, assistant_only_loss=True, bf16=True,
                           use_cpu=args.device == "cpu", max_steps=args.warmup + args.steps,
                           learning_rate=1e-4, save_strategy="no", report_to=[],
                           logging_strategy="no", dataloader_num_workers=0, **extra)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(
                                 directory, **extra.pop("model_init_kwargs", {})),
                             args=config, processing_class=AutoTokenizer.from_pretrained(
                                 directory),
                             train_dataset=load_dataset("json", data_files=args.data,
                                                        split="train"),
                             callbacks=[Timer()])
        collate = trainer.data_collator

        def counting_collator(examples):
            batch = collate(examples)
            tokens_per_step.append(int(batch["attention_mask"].sum()) if "attention_mask"
                                   in batch else int(batch["input_ids"].numel()))
            return batch

        trainer.data_collator = counting_collator
        trainer.train()
    timed = slice(args.warmup, args.warmup + args.steps)
    seconds = step_times[timed.stop - 1] - step_times[timed.start - 1]
    return {"tokens_per_s": sum(tokens_per_step[timed]) / seconds,
            "s_per_step": seconds / args.steps,
            "train_peak_mb": sampler.peak_mb(wall_times[timed.start - 1], wall_times[-1])}


def run_ceiling(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    directory = model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    stream: list[int] = []
    for line in Path(args.data).read_text().splitlines():
        stream += tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True,
                                                return_dict=False)
    width = args.max_len
    rows = torch.tensor(stream[: len(stream) // width * width]).view(-1, width).to(args.device)
    model = AutoModelForCausalLM.from_pretrained(directory).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times, wall_times = [], []
    sampler = RssSampler()
    for step in range(args.warmup + args.steps):
        start = (step * args.batch_size) % (len(rows) - args.batch_size)
        batch = rows[start:start + args.batch_size]
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        wall_times.append(time.time())
    seconds = times[-1] - times[args.warmup - 1]
    return {"tokens_per_s": args.steps * args.batch_size * width / seconds,
            "s_per_step": seconds / args.steps,
            "train_peak_mb": sampler.peak_mb(wall_times[args.warmup - 1], wall_times[-1])}


def run_child(args: argparse.Namespace) -> None:
    runners = {"ours": run_ours, "ours-compiled": lambda a: run_ours(a, compile=True),
               "ours-unchunked": run_ours,
               "trl-default": lambda a: run_trl(a, None),
               "trl-best": lambda a: run_trl(a, False), "ceiling": run_ceiling}
    result = runners[args.contender](args)
    result["peak_rss_mb"] = _peak_rss_mb()
    if args.device != "cpu":
        import torch

        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- parent
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="homefire/tiny-qwen3-10m",
                        help=f"a built-in model, a real-shape preset built offline at random "
                             f"init ({', '.join(PRESETS)}), or a local Hugging Face directory")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then also MFU and peak "
                        "GPU memory; TRL's best setting becomes padding-free)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: by card name)")
    parser.add_argument("--only", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--data-shape", choices=sorted(DATA_SHAPES), default="mixed")
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        run_child(args)
        return

    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="homefire-bench-"))
    data = tmp / "chats.jsonl"
    make_data(data, AutoTokenizer.from_pretrained(model_dir(args.model)), args.max_len,
              shape=args.data_shape)
    results: dict[str, list[dict]] = {name: [] for name in args.only}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    for round_index in range(args.rounds):
        for name in args.only:
            out = tmp / f"{name}-{round_index}.json"
            cmd = [sys.executable, __file__, "--contender", name, "--data", str(data),
                   "--data-shape", args.data_shape,
                   "--out", str(out), "--model", args.model, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--max-len", str(args.max_len), "--threads", str(args.threads),
                   "--device", args.device]
            print(f"round {round_index + 1}/{args.rounds}: {name} ...", flush=True)
            child = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"{name} failed:\n{child.stderr[-4000:]}")
            results[name].append(json.loads(out.read_text()))

    def best(name: str, key: str) -> float:
        return max(r[key] for r in results[name])

    print(f"\nSFT throughput: {args.model}, batch {args.batch_size} x max {args.max_len} tokens, "
          f"{args.threads} threads, {args.steps} timed steps, best of {args.rounds} round(s), "
          f"data shape {args.data_shape} ({DATA_SHAPES[args.data_shape][0]:.0%}-"
          f"{DATA_SHAPES[args.data_shape][1]:.0%} of max_len)")
    print(f"{'contender':<14} {'real tok/s':>10} {'s/step':>8} {'train MB':>8} {'peak MB':>8}"
          f"   (train: peak RSS during the timed steps; peak: whole process, load and final "
          f"checkpoint included)")
    for name in args.only:
        fastest = max(results[name], key=lambda r: r["tokens_per_s"])
        print(f"{name:<14} {fastest['tokens_per_s']:>10.0f} {fastest['s_per_step']:>8.3f} "
              f"{min(r['train_peak_mb'] for r in results[name]):>8.0f} "
              f"{fastest['peak_rss_mb']:>8.0f}")
    if args.device != "cpu":
        import torch

        card = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card),
                                        None)
        params = parameter_count(args.model)
        print(f"\n{card}: MFU = tokens/s x 6 x {params / 1e6:.0f}M params / "
              f"{peak or '?'} TFLOP/s (real tokens only; attention FLOPs not counted)")
        for name in args.only:
            fastest = max(results[name], key=lambda r: r["tokens_per_s"])
            mfu = (f"{fastest['tokens_per_s'] * 6 * params / (peak * 1e12):6.1%}" if peak
                   else "     ?")
            print(f"{name:<14} MFU {mfu}  peak GPU memory {fastest['gpu_peak_mb']:>8.0f} MB")
    if "ours-compiled" in results:
        print(f"(ours-compiled: {COMPILE_EXTRA_WARMUP} extra untimed warm-up steps; steps "
              f"2-{args.warmup + COMPILE_EXTRA_WARMUP} incl. compiles took "
              f"{min(r['warmup_s'] for r in results['ours-compiled']):.0f} s)")
    for ours in ("ours", "ours-compiled", "ours-unchunked"):
        if ours not in results:
            continue
        print()
        for name in args.only:
            if not name.startswith("ours"):
                ratio = best(ours, "tokens_per_s") / best(name, "tokens_per_s")
                print(f"{ours} / {name:<12} {ratio:5.2f}x")


if __name__ == "__main__":
    main()
