"""The checkpoint store: jobs, train states (DCP), sampler snapshots and promoted models.

The store is the local stand-in for the hosted service's buckets. It lives under one fsspec URL
(``InfraConfig.storage_root``; default ``~/.cache/homefire/store``) so that another run, on this
machine or another that sees the same URL, can resolve ``job_id:checkpoint_name``::

    {root}/jobs/{job_id}/job.json                       the job record (base model, lora rank)
    {root}/jobs/{job_id}/states/{name}/                 DCP train state + meta.json
    {root}/jobs/{job_id}/samplers/{snapshot_name}/      HF weights for inference + meta.json
    {root}/models/accounts/{account}/models/{id}/       promoted models + meta.json
    {root}/cache/{namespace}/{key}                      derived data (e.g. reference log-probs)

An entry exists only once its ``meta.json`` is written, and ``meta.json`` is written last, so a
save that dies half-way leaves a directory that readers ignore and the next save of the same name
replaces.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from training.faults import fault_point
from training.sdk.names import (  # the name grammars, importable from here as before
    CROSS_JOB_SCHEME,  # noqa: F401
    TINKER_SCHEME,  # noqa: F401
    make_cross_job_ref,  # noqa: F401
    make_tinker_path,  # noqa: F401
    new_job_id,
    parse_checkpoint_ref,  # noqa: F401
    parse_tinker_path,  # noqa: F401
    validate_name,
)

META_FILE = "meta.json"
DEFAULT_ACCOUNT = "local"

SnapshotType = Literal["INFERENCE_BASE", "INFERENCE_LORA", "INFERENCE_ARC_V2"]
PROMOTABLE_SNAPSHOT_TYPES = ("INFERENCE_BASE", "INFERENCE_LORA")
DELTA_MANIFEST_FILE = "delta_manifest.json"
"""Present in (and only in) a delta snapshot; see :mod:`training.sdk.snapshots`."""
WEIGHTS_MANIFEST_FILE = "weights_manifest.json"
"""Per-tensor dtype, shape and checksum of a base snapshot's weights."""
ADAPTER_CONFIG_FILE = "adapter_config.json"
"""The PEFT file that marks a LoRA adapter snapshot."""



class StoreError(Exception):
    """Base class of store errors."""


class JobNotFoundError(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CheckpointNotFoundError(StoreError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def default_storage_root() -> str:
    """``$HOMEFIRE_STORAGE_ROOT``, else ``$HOMEFIRE_CACHE_DIR/store``, else ``~/.cache/homefire/store``."""
    if os.environ.get("HOMEFIRE_STORAGE_ROOT"):
        return os.environ["HOMEFIRE_STORAGE_ROOT"]
    cache = os.environ.get("HOMEFIRE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "homefire")
    return os.path.join(cache, "store")


def default_account() -> str:
    return os.environ.get("HOMEFIRE_ACCOUNT", DEFAULT_ACCOUNT)


@dataclass
class JobRecord:
    """One trainer job: the owner of a set of checkpoints."""

    job_id: str
    base_model: str
    lora_rank: int = 0
    account: str = DEFAULT_ACCOUNT
    created_at: float = field(default_factory=time.time)
    user_metadata: dict[str, str] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    """LoRA settings of a lora_rank > 0 job (alpha, dropout, target_modules), so a reattached
    job rebuilds the same adapter."""


@dataclass
class EntryMeta:
    """``meta.json`` of a state, sampler snapshot or promoted model."""

    kind: Literal["state", "sampler", "model"]
    name: str
    job_id: str | None
    base_model: str
    created_at: float
    expires_at: float | None = None
    snapshot_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and time.time() >= self.expires_at


class CheckpointStore:
    """Filesystem layout and commit protocol of jobs, states, snapshots and models.

    ``root`` is any fsspec URL or local path. Writers call :meth:`staging_dir` to get a directory
    to fill and :meth:`commit` to publish it; readers see only committed entries.
    """

    def __init__(self, root: str | None = None, *, create: bool = True) -> None:
        """``create=False`` opens only an existing store (:class:`StoreError` otherwise)."""
        root = root or default_storage_root()
        if "://" not in root:
            # Recorded in run.json and used from other directories: make it absolute.
            root = os.path.abspath(os.path.expanduser(root))
        self.root_url = root
        self.fs, root_path = fsspec.core.url_to_fs(self.root_url)
        self.root = root_path.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if create:
            self.fs.makedirs(self.root, exist_ok=True)
        elif not self.fs.isdir(self.root):
            raise StoreError(f"no checkpoint store at {self.root_url}: check the path (or "
                             f"InfraConfig.storage_root); nothing was created there")

    def __repr__(self) -> str:
        return f"CheckpointStore({self.root_url!r})"

    # ---------------------------------------------------------------- paths
    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def job_dir(self, job_id: str) -> str:
        return self._join("jobs", job_id)

    def state_dir(self, job_id: str, name: str) -> str:
        return self._join("jobs", job_id, "states", name)

    def sampler_dir(self, job_id: str, snapshot_name: str) -> str:
        return self._join("jobs", job_id, "samplers", snapshot_name)

    def model_dir(self, account: str, model_id: str) -> str:
        return self._join("models", "accounts", account, "models", model_id)

    def cache_path(self, namespace: str, key: str) -> str:
        """Path of a derived-data cache file, ``{root}/cache/{namespace}/{key}``.

        For values that are expensive to compute and fully determined by ``key`` (reference
        log-probs of a dataset under a model, ...): any run on the same store reuses them.
        Write it with :meth:`write_bytes_atomic`, read it with :meth:`read_bytes`.
        """
        return self._join("cache", validate_name(namespace, "cache namespace"),
                          validate_name(key, "cache key"))

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see either the old file or the new one, never a
        torn one (local: write-fsync-rename; remote: one object upload)."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if not self.is_local:
            with self.fs.open(path, "wb") as f:
                f.write(data)
            return
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def read_bytes(self, path: str) -> bytes | None:
        """A file's contents, or None if it does not exist."""
        try:
            with self.fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def url(self, path: str) -> str:
        """The fsspec URL of a store path (for DCP readers/writers and users)."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    # ---------------------------------------------------------------- json helpers
    def _write_json(self, path: str, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, indent=2, sort_keys=True).encode()
        if self.is_local:
            # Write-then-rename so a reader never sees a torn meta.json.
            tmp = f"{path}.tmp-{secrets.token_hex(4)}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.url(path)} is corrupt ({e}); delete its directory "
                             f"to drop that entry") from e

    # ---------------------------------------------------------------- jobs
    def create_job(self, base_model: str, lora_rank: int = 0, job_id: str | None = None,
                   account: str | None = None,
                   user_metadata: dict[str, str] | None = None,
                   lora: dict[str, Any] | None = None) -> JobRecord:
        job = JobRecord(job_id=validate_name(job_id, "job id") if job_id else new_job_id(),
                        base_model=base_model, lora_rank=lora_rank,
                        account=account or default_account(), user_metadata=user_metadata or {},
                        lora=lora)
        if self.fs.exists(self._join("jobs", job.job_id, "job.json")):
            raise StoreError(f"job {job.job_id!r} already exists in {self.root_url}")
        self.fs.makedirs(self.job_dir(job.job_id), exist_ok=True)
        self._write_json(self._join("jobs", job.job_id, "job.json"), asdict(job))
        return job

    def get_job(self, job_id: str) -> JobRecord:
        validate_name(job_id, "job id")
        path = self._join("jobs", job_id, "job.json")
        payload = self._read_json(path)
        if payload is None:
            if self.fs.exists(self.job_dir(job_id)):
                raise JobNotFoundError(
                    f"trainer job {job_id!r} has a directory in {self.root_url} but no "
                    f"job.json (its record was deleted or never finished writing): its "
                    f"checkpoints cannot be used without it; restore job.json or use another "
                    f"job")
            known = [j for j in self.list_jobs() if j != job_id][:10]
            raise JobNotFoundError(f"no trainer job {job_id!r} in the store {self.root_url} "
                                   f"(known jobs: {', '.join(known) or 'none'}); "
                                   f"check the job id or InfraConfig.storage_root")
        try:
            return JobRecord(**payload)
        except TypeError as e:
            raise StoreError(f"{self.url(path)} is not a trainer job record ({e}); restore it "
                             f"or delete the job's directory") from None

    def list_jobs(self) -> list[str]:
        base = self._join("jobs")
        if not self.fs.exists(base):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    # ---------------------------------------------------------------- entries
    @contextmanager
    def staging_dir(self, final_dir: str) -> Iterator[str]:
        """Yield a local directory to fill; on success it becomes ``final_dir`` (without meta).

        Local stores write in place after removing any stale, uncommitted leftover of the same
        name; remote stores stage in a local temp dir and upload it.
        """
        self.clear_entry(final_dir)
        local = self.open_entry(final_dir)
        try:
            yield local
        except BaseException:
            self.abort_entry(final_dir, local)
            raise
        self.close_entry(final_dir, local)

    # The steps of staging_dir, for writers that finish later (async saves) or together with
    # other processes (each rank of a sharded save writes its own files into one entry).
    def clear_entry(self, final_dir: str) -> None:
        """Remove a stale, uncommitted leftover of ``final_dir`` (before any writer opens it)."""
        if self.fs.exists(final_dir):
            self.fs.rm(final_dir, recursive=True)

    def open_entry(self, final_dir: str) -> str:
        """A local directory to write ``final_dir``'s files into: the entry itself on a local
        store, a temp dir that :meth:`close_entry` uploads on a remote one."""
        if self.is_local:
            os.makedirs(final_dir, exist_ok=True)
            return final_dir
        return tempfile.mkdtemp(prefix="homefire-stage-")

    def close_entry(self, final_dir: str, local: str) -> None:
        """The files are complete: upload them (remote store) and drop the temp dir."""
        if self.is_local:
            return
        try:
            self.fs.put(local.rstrip("/") + "/", final_dir, recursive=True)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def abort_entry(self, final_dir: str, local: str) -> None:
        """A write failed: free its space now (a disk-full save must not make things worse);
        a crash that skips this leaves a dir without meta.json, cleaned on the next run."""
        shutil.rmtree(local, ignore_errors=True)

    def commit(self, entry_dir: str, meta: EntryMeta) -> None:
        """Publish an entry by writing its ``meta.json`` (the last file written)."""
        if self.is_local:
            _fsync_tree(entry_dir)
        fault_point(f"commit.{meta.kind}")  # test hook: all files written, meta.json not yet
        self._write_json(f"{entry_dir}/{META_FILE}", asdict(meta))

    def read_meta(self, entry_dir: str) -> EntryMeta | None:
        path = f"{entry_dir}/{META_FILE}"
        payload = self._read_json(path)
        if payload is None:
            return None
        try:
            if not isinstance(payload, dict):
                raise TypeError(f"a JSON {type(payload).__name__}, not an object")
            return EntryMeta(**payload)
        except TypeError as e:
            raise StoreError(f"{self.url(path)} is not a checkpoint record ({e}); the entry is "
                             f"damaged: delete its directory to drop it") from None

    def delete(self, entry_dir: str) -> None:
        """Unpublish first (meta.json), then remove the files: never a half-visible entry."""
        meta_path = f"{entry_dir}/{META_FILE}"
        if self.fs.exists(meta_path):
            self.fs.rm(meta_path)
        if self.fs.exists(entry_dir):
            self.fs.rm(entry_dir, recursive=True)

    def _list_entries(self, parent: str) -> list[EntryMeta]:
        if not self.fs.exists(parent):
            return []
        metas = []
        for path in self.fs.ls(parent, detail=False):
            meta = self.read_meta(path.rstrip("/"))
            if meta is not None and not meta.expired:
                metas.append(meta)
        return sorted(metas, key=lambda m: (m.created_at, m.name))

    def list_states(self, job_id: str) -> list[EntryMeta]:
        return self._list_entries(self._join("jobs", job_id, "states"))

    def list_samplers(self, job_id: str) -> list[EntryMeta]:
        return self._list_entries(self._join("jobs", job_id, "samplers"))

    def get_state(self, job_id: str, name: str) -> EntryMeta:
        self.get_job(job_id)
        meta = self.read_meta(self.state_dir(job_id, name))
        if meta is None or meta.expired:
            known = ", ".join(m.name for m in self.list_states(job_id)) or "none"
            raise CheckpointNotFoundError(
                f"job {job_id!r} has no train state {name!r}"
                f"{' (it expired)' if meta is not None else ''}; its states: {known}")
        return meta

    def get_sampler(self, job_id: str, snapshot_name: str) -> EntryMeta:
        self.get_job(job_id)
        meta = self.read_meta(self.sampler_dir(job_id, snapshot_name))
        if meta is None or meta.expired:
            known = ", ".join(m.name for m in self.list_samplers(job_id)) or "none"
            raise CheckpointNotFoundError(
                f"job {job_id!r} has no sampler snapshot {snapshot_name!r}"
                f"{' (it expired)' if meta is not None else ''}; its snapshots: {known}")
        return meta

    def infer_snapshot_type(self, entry_dir: str) -> SnapshotType:
        """A sampler snapshot's type, from the files it holds.

        ``delta_manifest.json`` makes an ``INFERENCE_ARC_V2`` delta, ``adapter_config.json`` an
        ``INFERENCE_LORA`` adapter, and ``config.json`` with safetensors weights an
        ``INFERENCE_BASE`` model. Raises StoreError for anything else.
        """
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(entry_dir, detail=False)}
        if DELTA_MANIFEST_FILE in names:
            return "INFERENCE_ARC_V2"
        if ADAPTER_CONFIG_FILE in names:
            return "INFERENCE_LORA"
        if "config.json" in names and any(n.endswith(".safetensors") for n in names):
            return "INFERENCE_BASE"
        raise StoreError(f"{self.url(entry_dir)} is not a sampler snapshot: it has neither "
                         f"{DELTA_MANIFEST_FILE}, {ADAPTER_CONFIG_FILE}, nor config.json with "
                         f"safetensors weights (files: {', '.join(sorted(names)) or 'none'})")

    def cleanup_expired(self, job_id: str, keep: set[str] | frozenset[str] = frozenset(),
                        ) -> list[str]:
        """Delete the job's expired states and snapshots; returns what was deleted.

        Entries named in ``keep`` (e.g. the state a resume needs) are never deleted.
        """
        deleted = []
        for sub in ("states", "samplers"):
            parent = self._join("jobs", job_id, sub)
            if not self.fs.exists(parent):
                continue
            for path in self.fs.ls(parent, detail=False):
                meta = self.read_meta(path.rstrip("/"))
                if meta is not None and meta.expired and meta.name not in keep:
                    self.delete(path.rstrip("/"))
                    deleted.append(f"{sub}/{meta.name}")
        return deleted

    def incomplete_entries(self, job_id: str) -> list[str]:
        """The job's state and snapshot directories without ``meta.json``: saves that died
        half-way (or are being written right now by the job's live trainer)."""
        found = []
        for sub in ("states", "samplers"):
            parent = self._join("jobs", job_id, sub)
            if not self.fs.exists(parent):
                continue
            for path in self.fs.ls(parent, detail=False):
                path = path.rstrip("/")
                if self.fs.isdir(path) and not self.fs.exists(f"{path}/{META_FILE}"):
                    found.append(path)
        return sorted(found)

    @contextmanager
    def local_copy(self, entry_dir: str) -> Iterator[str]:
        """A local directory with the entry's files (the entry itself on a local store)."""
        if self.is_local:
            yield entry_dir
            return
        with tempfile.TemporaryDirectory(prefix="homefire-fetch-") as tmp:
            self.fs.get(entry_dir.rstrip("/") + "/", tmp, recursive=True)
            yield tmp

    def copy_dir(self, src: str, dst: str) -> None:
        """Copy an entry's files (not its meta.json) to ``dst``."""
        if self.is_local:
            shutil.copytree(src, dst, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(META_FILE))
            return
        for path in self.fs.find(src):
            rel = path[len(src.rstrip("/")) + 1:]
            if rel != META_FILE:
                self.fs.copy(path, f"{dst}/{rel}")


def _fsync_tree(path: str) -> None:
    """Flush a freshly written directory to disk before it is published (crash safety)."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
