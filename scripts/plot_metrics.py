"""Plot a run's ``metrics.jsonl`` as PNG curves::

    python scripts/plot_metrics.py ./my_training            # writes ./my_training/plots/*.png
    python scripts/plot_metrics.py ./my_training --out figs

One PNG per metric that the run logged, against the step: loss, reward, accuracy, learning
rate and tokens/s (each recipe logs its own subset; DPO-style recipes log rewards and
accuracies under names containing those words). Needs matplotlib, an optional extra:
``pip install 'homefire[plot]'`` (or ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
PLOTS_DIR = "plots"
# (file stem, title, predicate on a metric name): which metrics go into which figure.
FIGURES = (
    ("loss", "Loss", lambda k: k == "loss" or k.endswith("_loss")
     or (k.startswith("loss") and k != "loss_scale")),  # fp16's loss_scale is no loss
    ("reward", "Reward", lambda k: "reward" in k),
    ("accuracy", "Accuracy", lambda k: "accuracy" in k or k.endswith("_acc")),
    ("learning_rate", "Learning rate", lambda k: k in ("learning_rate", "lr")),
    ("tokens_per_s", "Tokens/s", lambda k: k in ("tokens_per_s", "tokens_per_second")),
)


def read_rows(log_path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = log_path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the log_path of a run that has "
                                f"trained at least one step")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``metric -> (steps, values)`` for every numeric metric."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = out.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(float(value))
    return out


def plot(log_path: Path, out_dir: Path) -> list[Path]:
    """Write one PNG per figure that has data; returns the files written."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plot_metrics.py needs matplotlib: pip install 'homefire[plot]' (or "
                          "pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    data = series(read_rows(log_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, wanted in FIGURES:
        keys = sorted(k for k in data if wanted(k))
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            ax.plot(*data[key], label=key)
        ax.set_xlabel("step")
        ax.set_title(f"{title} ({log_path.name})")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot a run's metrics.jsonl as PNG curves.")
    parser.add_argument("log_path", type=Path, help="the run's log_path")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output directory (default: LOG_PATH/{PLOTS_DIR})")
    args = parser.parse_args(argv)
    try:
        written = plot(args.log_path, args.out or args.log_path / PLOTS_DIR)
    except (FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not written:
        print(f"error: {args.log_path / 'metrics.jsonl'} has no loss, reward, accuracy, "
              f"learning-rate or tokens/s values to plot", file=sys.stderr)
        return EXIT_BAD_INPUT
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
