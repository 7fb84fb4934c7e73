"""Per-step metrics (``{log_path}/metrics.jsonl``) and the progress display."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def truncate_steps_after(path: str | os.PathLike[str], start_step: int) -> None:
    """Drop the rows of a per-step JSONL file whose ``step`` is after ``start_step``.

    A resumed run rewrites the steps after its checkpoint, so their old rows (and a torn last
    line from the crash) must go first; the file is replaced atomically.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a crash mid-write
        if isinstance(row, dict) and row.get("step", math.inf) <= start_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsLogger:
    """Appends one JSON row per step to ``{log_path}/metrics.jsonl``.

    On resume from step ``start_step`` the rows of steps after it (written by the interrupted
    run after its last checkpoint) are dropped first, so the file never has duplicate steps.
    """

    def __init__(self, log_path: str | os.PathLike[str], start_step: int = 0,
                 sinks: list[Any] | None = None) -> None:
        self.path = Path(log_path) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_steps_after(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.sinks = sinks or []
        """Extra destinations (:class:`TensorBoardSink`, :class:`WandbSink`): ``log(step,
        metrics)`` and ``close()``."""


    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink.log(step, metrics)

    def sync(self) -> None:
        """Make every row written so far durable (a power cut keeps them): called before each
        checkpoint is saved, so the rows up to a checkpoint survive whatever it survives."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "time"}


class TensorBoardSink:
    """Mirrors each step's numeric metrics to TensorBoard event files in ``log_dir``.

    On resume from ``start_step`` the events after it (from the interrupted run) are purged, so
    curves have no doubled segments. Needs the optional ``tensorboard`` package.
    """

    def __init__(self, log_dir: str | os.PathLike[str], start_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises ImportError naming tensorboard
            raise ImportError(f"tensorboard_dir={str(log_dir)!r} needs the tensorboard package: "
                              f"pip install 'homefire[tensorboard]', or unset tensorboard_dir"
                              ) from e
        self._writer = SummaryWriter(log_dir=str(log_dir),
                                     purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in _numeric(metrics).items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


WANDB_RUN_ID_FILE = "wandb_run_id"


class WandbSink:
    """Logs each step's numeric metrics to a Weights & Biases run.

    The run id is kept in ``{log_path}/wandb_run_id``, so a resumed training run continues the
    same W&B run (``resume="allow"``) instead of starting a new one. W&B ignores steps at or
    below the run's last logged step, so steps redone after the resume point keep their first
    values (the same losses: the resume is exact). Needs the optional ``wandb`` package (``WANDB_MODE=offline`` works without
    an account).
    """

    def __init__(self, log_path: str | os.PathLike[str], project: str,
                 config: dict[str, Any] | None = None, name: str | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError(f"wandb_project={project!r} needs the wandb package: pip install "
                              f"'homefire[wandb]', or unset wandb_project") from None
        id_file = Path(log_path) / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        if not id_file.exists():
            id_file.write_text(run_id)
        self.run = wandb.init(project=project, id=run_id, resume="allow", config=config,
                              name=name, dir=str(log_path))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(_numeric(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def read_metrics(log_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(log_path) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class Progress:
    """A progress bar with step, loss, tokens/s and ETA that stays right across a resume.

    On a terminal it is a tqdm bar; otherwise (CI, log files) it prints a plain line about every
    ``plain_interval_s`` seconds and at the end. The ETA counts only steps run by this process,
    so the time spent loading a checkpoint does not distort it.
    """

    def __init__(self, total_steps: int, start_step: int, desc: str,
                 plain_interval_s: float = 10.0) -> None:
        self.total = total_steps
        self.step = start_step
        self.desc = desc
        self.interactive = sys.stderr.isatty()
        self.plain_interval_s = plain_interval_s
        self._last_print = 0.0
        self._start_time = time.monotonic()
        self._start_step = start_step
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                         dynamic_ncols=True, disable=not self.interactive)

    def update(self, step: int, postfix: dict[str, str]) -> None:
        self._bar.update(step - self.step)
        self.step = step
        if self.interactive:
            self._bar.set_postfix(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_print >= self.plain_interval_s or step == self.total:
            self._last_print = now
            fields = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"{self.desc} step {step}/{self.total} {fields} eta {self.eta()}",
                  file=sys.stderr, flush=True)

    def eta(self) -> str:
        done = self.step - self._start_step
        if done <= 0:
            return "?"
        remaining = (time.monotonic() - self._start_time) / done * (self.total - self.step)
        return time.strftime("%H:%M:%S", time.gmtime(remaining))

    def close(self) -> None:
        self._bar.close()
