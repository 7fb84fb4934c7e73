"""Promote a checkpoint recorded in a run's ``checkpoints.jsonl`` to a model in the local registry.

Only rows with a ``sampler_path`` (saved with ``kind=SAMPLER`` or ``kind=BOTH``; the final
checkpoint of a recipe always is) can be promoted. STATE-only rows hold DCP optimizer state +
weights for resuming and are refused with an explanation::

    # Promote the latest promotable checkpoint:
    python scripts/promote_checkpoint.py --checkpoints-jsonl ./my_training/checkpoints.jsonl

    # Promote a specific step, under a chosen model id:
    python scripts/promote_checkpoint.py --checkpoints-jsonl ./my_training/checkpoints.jsonl \\
        --step 50 --output-model-id my-fine-tuned-model

A row needs ``sampler_path`` (the snapshot name, e.g. ``step-50-a1b2c3d4``) and
``source_job_id``, or a ``sampler_path`` that is a ``tinker://<run>/sampler_weights/<name>`` path
(rows that tinker-cookbook writes through the trainer server); ``step`` (or the cookbook's
``batch``) selects it with ``--step`` and names the default model id, and
``base_model``, when present, is checked against the trainer job's. The checkpoint store is
``--storage-root``, else the ``storage_root`` recorded in ``run.json`` beside the JSONL file,
else the default store. Bad input exits with status 2 and a message on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if importlib.util.find_spec("training") is None:
    # Run from a checkout without `pip install -e .`: the package lives next to scripts/.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.utils.checkpoints import CheckpointRow  # noqa: E402 (after the path set-up)

EXIT_BAD_INPUT = 2
RUN_FILE = "run.json"
"""Written by the recipes beside ``checkpoints.jsonl``; its ``storage_root`` locates the store."""

_MAX_MODEL_ID_LENGTH = 63


class PromoteInputError(Exception):
    """The JSONL file, run.json or the arguments cannot be used; the message says why."""


@dataclass
class LocatedRow:
    """One parsed row of ``checkpoints.jsonl`` and where it came from (for messages)."""

    row: CheckpointRow
    where: str
    """``path:line``."""

    @property
    def step(self) -> Any:
        """``step`` (homefire's rows), else ``batch`` (tinker-cookbook's rows)."""
        return self.row.step if self.row.step is not None else self.row.extra.get("batch")

    @property
    def sampler_path(self) -> str | None:
        return self.row.sampler_path or None


def read_checkpoint_rows(path: Path) -> list[LocatedRow]:
    """The rows of ``checkpoints.jsonl`` in file order (the order the saves completed).

    A torn last line is skipped with a warning: rows are appended after each save completes, so
    a crash during the append can leave half a line at the end and every row before it is
    still good. A bad line anywhere else means the file was edited or corrupted, and is an error.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PromoteInputError(f"{path} does not exist; pass the checkpoints.jsonl in the "
                                f"run's log_path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromoteInputError(f"cannot read {path}: {e}") from e
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    rows = []
    for index, (lineno, line) in enumerate(numbered):
        where = f"{path}:{lineno}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            if index == len(numbered) - 1:
                print(f"warning: ignoring {where}: not valid JSON ({e}); a save was probably "
                      f"interrupted while appending it", file=sys.stderr)
                continue
            raise PromoteInputError(f"{where} is not valid JSON ({e}); fix or delete that "
                                    f"line") from None
        if not isinstance(fields, dict):
            raise PromoteInputError(f"{where} is a JSON {type(fields).__name__}, not an object "
                                    f"with 'name', 'step', 'sampler_path', ... fields")
        rows.append(LocatedRow(CheckpointRow.from_dict(fields), where))
    return rows


def select_row(rows: list[LocatedRow], step: int | None, path: Path) -> LocatedRow:
    """The row to promote: the latest with a ``sampler_path``, or the one of ``step``."""
    promotable = [row for row in rows if row.sampler_path]
    promotable_steps = ", ".join(str(row.step) for row in promotable) or "none"
    resave = ("STATE checkpoints hold DCP (optimizer + weights) for resuming only; save with "
              "save_checkpoint(kind=SAMPLER) or kind=BOTH to make a step promotable (the final "
              "checkpoint of a recipe always uses BOTH)")
    if not rows:
        raise PromoteInputError(f"{path} has no checkpoint rows yet; a row is appended after "
                                f"each completed save")
    if step is None:
        if not promotable:
            raise PromoteInputError(f"no promotable checkpoint in {path}: all {len(rows)} rows "
                                    f"have only a state_path. {resave}")
        return promotable[-1]
    at_step = [row for row in rows if row.step == step]
    if not at_step:
        steps = ", ".join(str(row.step) for row in rows)
        raise PromoteInputError(f"{path} has no row for step {step}; steps saved: {steps}; "
                                f"promotable steps: {promotable_steps}")
    with_sampler = [row for row in at_step if row.sampler_path]
    if not with_sampler:
        raise PromoteInputError(f"step {step} ({at_step[-1].where}) is a STATE-only "
                                f"checkpoint (state_path, no sampler_path), which is not "
                                f"promotable. {resave}. Promotable steps: {promotable_steps}")
    return with_sampler[-1]


def default_output_model_id(log_dir: Path, row: LocatedRow) -> str:
    """``<log dir name>-step-<step>``, lowercased and cut to a valid model id."""
    suffix = f"step-{row.step}" if isinstance(row.step, int) else str(row.sampler_path)
    suffix = _sanitize(suffix)
    base = _sanitize(log_dir.resolve().name) or "model"
    base = base[: _MAX_MODEL_ID_LENGTH - len(suffix) - 1].rstrip("-") or "model"
    return f"{base}-{suffix}"[:_MAX_MODEL_ID_LENGTH].rstrip("-")


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def storage_root_from_run_file(jsonl_path: Path) -> str | None:
    """The ``storage_root`` in ``run.json`` beside the JSONL file, or None if it has none."""
    run_file = jsonl_path.parent / RUN_FILE
    if not run_file.exists():
        return None
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromoteInputError(f"{run_file} is unreadable ({e}); pass --storage-root "
                                f"explicitly") from e
    root = run.get("storage_root") if isinstance(run, dict) else None
    if root is not None and not isinstance(root, str):
        raise PromoteInputError(f"{run_file}: storage_root is {root!r}, not a path or URL; "
                                f"pass --storage-root explicitly")
    return root or None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Promote a checkpoint from a run's checkpoints.jsonl to a model.")
    parser.add_argument("--checkpoints-jsonl", required=True, type=Path,
                        help="the run's {log_path}/checkpoints.jsonl")
    parser.add_argument("--step", type=int, default=None,
                        help="promote this step's checkpoint (default: the latest promotable)")
    parser.add_argument("--output-model-id", default=None,
                        help="id of the new model (1-63 of a-z, 0-9, '-'; default: "
                             "<log dir name>-step-<step>)")
    parser.add_argument("--storage-root", default=None,
                        help="checkpoint store URL or path (default: storage_root in run.json "
                             "beside the JSONL file, else the default store)")
    parser.add_argument("--account", default=None,
                        help="account that owns the new model (default: the trainer job's)")
    parser.add_argument("--merge", action="store_true",
                        help="for a LoRA checkpoint: merge the adapter into its base and promote "
                             "a plain transformers model (default: the adapter directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the script; returns the exit status (0, or 2 for input that cannot be promoted)."""
    args = _parse_args(argv)
    try:
        return _promote(args)
    except PromoteInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _promote(args: argparse.Namespace) -> int:
    jsonl_path: Path = args.checkpoints_jsonl
    row = select_row(read_checkpoint_rows(jsonl_path), args.step, jsonl_path)
    job_id = row.row.source_job_id
    sampler_path = row.sampler_path
    if isinstance(sampler_path, str) and sampler_path.startswith("tinker://"):
        # A row written by a tinker client (tinker-cookbook) through the trainer server.
        from training.sdk.store import parse_tinker_path

        try:
            job_id, kind, sampler_path = parse_tinker_path(sampler_path)
        except ValueError as e:
            raise PromoteInputError(f"{row.where}: {e}") from None
        if kind != "sampler":
            raise PromoteInputError(f"{row.where}: sampler_path {row.sampler_path!r} is a "
                                    f"train state, not a sampler checkpoint")
    if not isinstance(job_id, str) or not job_id:
        raise PromoteInputError(f"{row.where} has a sampler_path but no source_job_id; add the "
                                f"id of the trainer job that saved it")
    if not isinstance(sampler_path, str):
        raise PromoteInputError(f"{row.where}: sampler_path is {sampler_path!r}, not a "
                                f"snapshot name")

    # Imported only now: it pulls in torch and transformers, which --help and bad input skip.
    from training.sdk.registry import ModelRegistry, RegistryError, validate_output_model_id
    from training.sdk.store import StoreError

    output_model_id = args.output_model_id
    if output_model_id is None:
        output_model_id = default_output_model_id(jsonl_path.parent, row)
        print(f"no --output-model-id given; using {output_model_id!r}")
    problems = validate_output_model_id(output_model_id)
    if problems:
        raise PromoteInputError("; ".join(problems))

    storage_root, source = args.storage_root, "--storage-root"
    if storage_root is None:
        storage_root, source = storage_root_from_run_file(jsonl_path), RUN_FILE
    if storage_root is None:
        source = "default store"
    elif not _exists(storage_root):
        # Opening a store creates its root: refuse a mistyped one instead of an empty store.
        raise PromoteInputError(f"checkpoint store {storage_root!r} (from {source}) does not "
                                f"exist; pass the run's InfraConfig.storage_root as "
                                f"--storage-root")
    try:
        registry = ModelRegistry(storage_root, account=args.account)
        print(f"store: {registry.store.root_url} ({source})")
        name = registry.checkpoint_name(job_id, sampler_path)
        print(f"promoting step {row.step}: {name} ({row.where})")
        model = registry.promote_checkpoint(name=name, output_model_id=output_model_id,
                                            base_model=row.row.base_model,
                                            merge=args.merge)
    except (RegistryError, StoreError, ValueError) as e:
        raise PromoteInputError(str(e)) from e
    print(f"model: {model['name']}")
    print(f"path:  {model['path']}")
    if model.get("checkpointType") == "INFERENCE_LORA":
        print(f"load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
              f"{model['base_model']!r}), {model['path']!r}) (or promote with --merge)")
    else:
        print(f"load it with: AutoModelForCausalLM.from_pretrained({model['path']!r})")
    return 0


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


if __name__ == "__main__":
    sys.exit(main())
