"""Print the status of a run: steps done, its checkpoints and their kinds, what a rerun would
do, and what can be promoted::

    python scripts/inspect_run.py ./my_training

It only reads: ``{log_path}/run.json``, ``checkpoints.jsonl``, ``metrics.jsonl`` and the
checkpoint store that run.json names (``--storage-root`` overrides it). Exit status 0, or 2 when
LOG_PATH holds no run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

if importlib.util.find_spec("training") is None:
    # Run from a checkout without `pip install -e .`: the package lives next to scripts/.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.sdk.names import parse_model_name  # noqa: E402
from training.sdk.registry import ModelRegistry  # noqa: E402
from training.sdk.store import CheckpointStore, StoreError  # noqa: E402
from training.utils.checkpoints import (  # noqa: E402
    CHECKPOINTS_FILE,
    RUN_FILE,
    CheckpointLog,
    CheckpointRow,
    read_run_identity,
)
from training.utils.config import ConfigError  # noqa: E402
from training.utils.metrics import read_metrics  # noqa: E402

EXIT_NO_RUN = 2


def _kind(row: CheckpointRow) -> str:
    if row.state_deleted:
        return f"STATE (deleted by {row.state_deleted})"
    state, sampler = bool(row.state_path), bool(row.sampler_path)
    return {(True, True): "BOTH", (True, False): "STATE", (False, True): "SAMPLER"}.get(
        (state, sampler), "?")


def _entry_status(store: CheckpointStore | None, path: str) -> str:
    if store is None:
        return "store unknown"
    try:
        meta = store.read_meta(path)
    except StoreError as e:
        return f"CORRUPT ({e})"
    if meta is None:
        return "MISSING" if not store.fs.exists(path) else "INCOMPLETE (no meta.json)"
    return "EXPIRED" if meta.expired else "ok"


def describe(log_path: Path, storage_root: str | None = None) -> list[str]:
    """The report's lines (raises FileNotFoundError when ``log_path`` holds no run)."""
    run = read_run_identity(log_path)
    log = CheckpointLog(log_path)
    if not run and not log.path.exists():
        raise FileNotFoundError(f"{log_path} holds no run (no {RUN_FILE} or {CHECKPOINTS_FILE});"
                                f" pass the log_path of a recipe run")
    root = storage_root or run.get("storage_root")
    store = CheckpointStore(root) if root and _exists(root) else None
    rows = log.rows()
    torn = log.path.exists() and len(log.path.read_bytes().splitlines()) > len(rows)
    metrics = read_metrics(log_path)
    total = run.get("total_steps")
    job = run.get("job_id") or (rows[-1].source_job_id if rows else None)

    lines = [f"Run {log_path}",
             f"  recipe {run.get('recipe', '?')}, base model {run.get('base_model', '?')}, "
             f"job {job or '?'}",
             f"  store {root or '?'}{'' if store is not None or not root else ' (NOT FOUND)'}"]
    last_metric = metrics[-1]["step"] if metrics else 0
    resume = log.last_resumable()
    lines.append(f"Steps: {resume.step if resume else 0} checkpointed of "
                 f"{total if total is not None else '?'} (metrics through step {last_metric})")

    promoted = _promoted(store, job)
    lines.append(f"Checkpoints ({log.path}):" if rows else f"Checkpoints: none in {log.path}")
    for row in rows:
        status = []
        if row.state_path and store is not None:
            state_dir = store.state_dir(row.source_job_id, row.name)
            status.append(f"state {_entry_status(store, state_dir)}")
        if row.sampler_path and store is not None:
            sampler_dir = store.sampler_dir(row.source_job_id, row.sampler_path)
            status.append(f"sampler {row.sampler_path} {_entry_status(store, sampler_dir)}")
        models = promoted.get(row.sampler_path or "", [])
        if models:
            status.append(f"promoted as {', '.join(models)}")
        lines.append(f"  {row.name:<12} step {row.step:<6} {_kind(row):<28} "
                     f"{'; '.join(status)}".rstrip())
    if torn:
        lines.append(f"  (last line of {log.path} is torn by a crash; the next save repairs it)")
    if store is not None and job:
        incomplete = store.incomplete_entries(job)
        if incomplete:
            names = ", ".join("/".join(path.rsplit("/", 2)[-2:]) for path in incomplete)
            lines.append(f"  incomplete checkpoint directories (interrupted saves, removed by "
                         f"the next run): {names}")

    lines.append(f"Next: {_next_action(log, resume, total)}")
    promotable = [r for r in rows if r.promotable]
    if promotable:
        latest = promotable[-1]
        steps = ", ".join(f"step {r.step}" for r in promotable)
        lines.append(f"Promotable: {steps}; "
                     f"promote the latest with: python scripts/promote_checkpoint.py "
                     f"--checkpoints-jsonl {log.path} --step {latest.step}")
    else:
        lines.append("Promotable: nothing yet (the final checkpoint of a run is; STATE "
                     "checkpoints are for resuming only)")
    return lines


def _next_action(log: CheckpointLog, resume: CheckpointRow | None, total: int | None) -> str:
    if resume is None:
        return ("a rerun starts from step 0 (no resumable checkpoint; set dcp_save_interval to "
                "save some)")
    where = f"{resume.name} (step {resume.step}, {resume.data_consumed} examples)"
    if total is not None and resume.step >= total:
        if log.latest_promotable(resume.step) is not None:
            return ("the run is complete: a rerun changes nothing (it promotes the final "
                    "checkpoint if output_model_id is set and that was interrupted)")
        return f"a rerun resumes from {where} and makes the final (BOTH) save"
    return (f"a rerun resumes from {where} and trains steps {resume.step + 1}-"
            f"{total if total is not None else '?'}")


def _promoted(store: CheckpointStore | None, job: str | None) -> dict[str, list[str]]:
    """Snapshot name -> names of models promoted from it (this job's only)."""
    out: dict[str, list[str]] = {}
    if store is None or job is None:
        return out
    for model in ModelRegistry(store).list_models():
        meta = store.read_meta(store.model_dir(*parse_model_name(model["name"])))
        if meta is not None and meta.extra.get("source_job_id") == job:
            out.setdefault(str(meta.extra.get("source_checkpoint_id")), []).append(model["name"])
    return out


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the status of a recipe run.")
    parser.add_argument("log_path", type=Path, help="the run's log_path")
    parser.add_argument("--storage-root", default=None,
                        help="checkpoint store (default: storage_root in run.json)")
    parser.add_argument("--json", action="store_true",
                        help="print checkpoints.jsonl rows and run.json as JSON instead")
    args = parser.parse_args(argv)
    try:
        if args.json:
            print(json.dumps({"run": read_run_identity(args.log_path),
                              "checkpoints": [row.to_dict() for row in
                                              CheckpointLog(args.log_path).rows()]}, indent=2))
            return 0
        print("\n".join(describe(args.log_path, args.storage_root)))
    except (FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_RUN
    return 0


if __name__ == "__main__":
    sys.exit(main())
