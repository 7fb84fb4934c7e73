"""Sampler snapshot benchmarks: delta size, hotload time, batched sampling throughput.

    .venv/bin/python benchmarks/sampler_snapshots.py [--model homefire/tiny-qwen3-10m]

Every figure is a ratio of two measurements taken in the same run, on the same machine:

1. delta size / base size at lr 1e-5 and at lr 1e-3 (bf16 snapshots; fp32 for comparison),
   in a run of 20 AdamW steps with a delta saved after each (what weight sync does): the
   first delta after the base (Adam's first step moves every weight by ~lr: the largest) and
   the median of the 20. Each delta is written with the default ``xor`` encoding and the same
   weights encoded ``ulp`` beside it. Sizes are of the files a save writes: ``delta.bin`` +
   ``delta_manifest.json`` of the delta, the ``.safetensors`` weights of the base.
   Target: <= 1/10 at lr 1e-5.
2. hotload time of a delta (``xor``, and ``ulp``) / full reload time (a fresh engine from the
   base snapshot directory, what restarting a deployment costs), and / in-place hotload of
   the base. Target: <= 1/3 of the full reload.
3. batched sampling tokens/s (8 prompts x 32 new tokens in one batch) / the same prompts
   generated one at a time with plain ``model.generate``. Target: >= 2x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.sdk import (  # noqa: E402  (after the path fix)
    AdamParams,
    Datum,
    DeploymentManager,
    ModelInput,
    SamplingParams,
    ServiceClient,
)
from training.sdk.deployments import TransformersEngine  # noqa: E402
from training.sdk.snapshots import (  # noqa: E402
    DELTA_DATA_FILE,
    DELTA_ENCODINGS,
    encode_delta,
    sampler_weights,
)
from training.sdk.store import DELTA_MANIFEST_FILE  # noqa: E402


def _batch(vocab: int, rows: int = 8, length: int = 128, seed: int = 0) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (rows, length + 1), generator=generator)
    return [Datum(model_input=ModelInput.from_ints(row[:-1].tolist()),
                  loss_fn_inputs={"target_tokens": row[1:]}) for row in tokens]


def _step(client, datums: list[Datum], lr: float) -> None:
    client.forward_backward(datums).result()
    client.optim_step(AdamParams(learning_rate=lr), "num_loss_tokens").result()


DELTA_FILES = (DELTA_DATA_FILE, DELTA_MANIFEST_FILE)


def _file_bytes(directory: str, names: tuple[str, ...] | None = None, suffix: str = "") -> int:
    """Bytes of the files of ``directory`` named ``names`` (any name if None) ending ``suffix``."""
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if (names is None or f in names) and f.endswith(suffix))


def delta_sizes(model: str, root: str, steps: int = 20) -> dict[str, dict[str, list[float]]]:
    """Bytes of each delta / bytes of the base's weights over ``steps`` steps, per sampler
    dtype, lr and delta encoding."""
    ratios: dict[str, dict[str, list[float]]] = {}
    for dtype in ("bfloat16", "float32"):
        for lr in (1e-5, 1e-3):
            service = ServiceClient(os.path.join(root, f"sizes-{dtype}-{lr:g}"), device="cpu",
                                    sampler_dtype=dtype)
            client = service.create_training_client(model)
            vocab = len(client.get_tokenizer())
            base = client.save_weights_for_sampler_ext("base", checkpoint_type="base")
            base_bytes = _file_bytes(service.store.sampler_dir(client.job_id, base.snapshot_name),
                                     suffix=".safetensors")
            series = ratios[f"{dtype} lr={lr:g}"] = {"xor": [], "ulp": []}
            reference = sampler_weights(client.model, client.sampler_dtype)
            for step in range(steps):
                _step(client, _batch(vocab, seed=step), lr)
                delta = client.save_weights_for_sampler_ext(f"step-{step}")
                delta_dir = service.store.sampler_dir(client.job_id, delta.snapshot_name)
                series["xor"].append(_file_bytes(delta_dir, DELTA_FILES) / base_bytes)
                new = sampler_weights(client.model, client.sampler_dtype)
                with tempfile.TemporaryDirectory() as tmp:  # the same weights, encoded "ulp"
                    encode_delta(new, reference, tmp, reference_identity=delta.path,
                                 encodings=DELTA_ENCODINGS["ulp"])
                    series["ulp"].append(_file_bytes(tmp, DELTA_FILES) / base_bytes)
                reference = new
    return ratios


def hotload_times(model: str, root: str, repeats: int = 5) -> dict[str, list[float]]:
    """Seconds of each delta hotload (per delta encoding), base hotload and full reload
    (``repeats`` of each)."""
    chains = {}
    for encoding in DELTA_ENCODINGS:
        service = ServiceClient(os.path.join(root, "hotload"), device="cpu",
                                sampler_dtype="bfloat16", delta_encoding=encoding)
        client = service.create_training_client(model)
        base = client.save_weights_for_sampler_ext("base")
        _step(client, _batch(len(client.get_tokenizer())), 1e-5)
        delta = client.save_weights_for_sampler_ext("delta")
        chains[encoding] = (base.path, delta.path)
        base_dir = service.store.sampler_dir(client.job_id, base.snapshot_name)
    manager = DeploymentManager(service.store, device="cpu", engine="transformers")
    manager.create_deployment(model, "bench")
    times: dict[str, list[float]] = {f"delta hotload ({e})": [] for e in chains}
    times.update({"base hotload": [], "full reload": []})
    for _ in range(repeats):
        for encoding, (base, delta) in chains.items():
            started = time.perf_counter()
            manager.hotload("bench", base, reset_prompt_cache=False)
            times["base hotload"].append(time.perf_counter() - started)
            started = time.perf_counter()
            manager.hotload("bench", delta, reset_prompt_cache=False)
            times[f"delta hotload ({encoding})"].append(time.perf_counter() - started)
        started = time.perf_counter()
        TransformersEngine.from_pretrained(base_dir, dtype=torch.float32)
        times["full reload"].append(time.perf_counter() - started)
    return times


def sampling_throughput(model: str, root: str, prompts: int = 8,
                        new_tokens: int = 32) -> dict[str, float]:
    """Generated tokens/s of one batched call vs one prompt at a time."""
    manager = DeploymentManager(os.path.join(root, "sampling"), device="cpu",
                                engine="transformers")
    deployment = manager.create_deployment(model, "bench")
    engine = deployment.engine
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 2000, (int(n),), generator=generator).tolist()
            for n in torch.randint(8, 24, (prompts,), generator=generator)]
    params = SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=0)
    deployment.sample(rows[:1], SamplingParams(max_tokens=2))  # warm up kernels
    started = time.perf_counter()
    out = deployment.sample(rows, params)
    batched_s = time.perf_counter() - started
    batched_tokens = sum(len(seqs[0].tokens) for seqs in out)
    tokenizer = engine.tokenizer
    started = time.perf_counter()
    single_tokens = 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            result = engine.model.generate(ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=new_tokens, do_sample=True,
                                           pad_token_id=tokenizer.pad_token_id)
            single_tokens += result.shape[1] - ids.shape[1]
    single_s = time.perf_counter() - started
    return {"batched tokens/s": batched_tokens / batched_s,
            "one-at-a-time tokens/s": single_tokens / single_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="homefire/tiny-qwen3-10m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="deltas per size run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="homefire-bench-") as root:
        sizes = delta_sizes(args.model, root, args.steps)
        times = hotload_times(args.model, root)
        speed = sampling_throughput(args.model, root)
    spread = {k: f"{min(v) * 1000:.1f}-{max(v) * 1000:.1f}" for k, v in times.items()}
    times = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}, {args.threads} threads, load average at the end "
          f"{os.getloadavg()[0]:.2f}")
    print(f"delta size / base size, a delta after each of {args.steps} AdamW steps "
          f"(first delta, median of all, last):")
    for name, series in sizes.items():
        for encoding, ratios in series.items():
            first, median = ratios[0], statistics.median(ratios)
            print(f"  {name:20s} {encoding:4s} first {first:.4f} (1/{1 / first:.1f})  median "
                  f"{median:.4f} (1/{1 / median:.1f})  last {ratios[-1]:.4f}")
    print("hotload (median of 5, min-max): " + ", ".join(
        f"{k} {v * 1000:.1f} ms ({spread[k]})" for k, v in times.items()))
    for encoding in DELTA_ENCODINGS:
        delta = times[f"delta hotload ({encoding})"]
        print(f"  delta hotload ({encoding}) / full reload {delta / times['full reload']:.3f}, "
              f"/ base hotload {delta / times['base hotload']:.3f}")
    ratio = speed["batched tokens/s"] / speed["one-at-a-time tokens/s"]
    print(f"sampling: batched {speed['batched tokens/s']:.0f} tokens/s, one at a time "
          f"{speed['one-at-a-time tokens/s']:.0f} tokens/s: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
