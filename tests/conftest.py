"""Shared fixtures. Every test session gets its own cache and store, so tests never touch (or
depend on) ~/.cache/homefire, and subprocesses launched by tests inherit the same settings."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

TEST_MODEL = "homefire/tiny-qwen3-test"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("HOMEFIRE_TEST_SESSION_DIR"):
        return  # already set by a parent pytest (xdist workers, nested runs)
    session_dir = tempfile.mkdtemp(prefix="homefire-tests-")
    os.environ["HOMEFIRE_TEST_SESSION_DIR"] = session_dir
    os.environ["HOMEFIRE_CACHE_DIR"] = os.path.join(session_dir, "cache")
    os.environ["HOMEFIRE_STORAGE_ROOT"] = os.path.join(session_dir, "default-store")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config.add_cleanup(lambda: shutil.rmtree(session_dir, ignore_errors=True))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The built-in unit-test model (~0.3M params), built once per session."""
    from training.sdk.tiny_model import ensure_tiny_model

    return ensure_tiny_model(TEST_MODEL)


@pytest.fixture
def store_root(tmp_path: Path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def make_client(store_root: str, tiny_model_dir: Path):
    """Factory: a fresh training client on the test model (fp32, its own service)."""
    from training.sdk import ServiceClient

    def _make(root: str | None = None, **kwargs):
        service = ServiceClient(root or store_root, mixed_precision="no", device="cpu")
        return service.create_training_client(TEST_MODEL, **kwargs)

    return _make


def checkpoint_rows(log_path: str | Path) -> list[dict]:
    """The rows of ``{log_path}/checkpoints.jsonl``, as the JSON objects of its lines."""
    from training.utils.checkpoints import CheckpointLog

    return [row.to_dict() for row in CheckpointLog(log_path).rows()]


def final_sampler_weights(base: str | Path, log_path: str | Path) -> dict:
    """The weights of a run's final sampler snapshot, in the store at ``{base}/store``."""
    from safetensors.torch import load_file

    from training.sdk.store import CheckpointStore

    final = checkpoint_rows(log_path)[-1]
    store = CheckpointStore(str(Path(base) / "store"))
    return load_file(f"{store.sampler_dir(final['source_job_id'], final['sampler_path'])}"
                     f"/model.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainerServerThread:
    """A trainer server on 127.0.0.1 in a background thread."""

    def __init__(self, store_root: str, api_key: str | None = None,
                 base_models: tuple[str, ...] | list[str] = (TEST_MODEL,)) -> None:
        import uvicorn

        from training.server.app import create_app
        from training.server.service import TrainerService

        self.service = TrainerService(list(base_models), store_root, device="cpu",
                                      mixed_precision="no")
        self.service.warm_up()
        self.port = free_port()
        config = uvicorn.Config(create_app(self.service, api_key=api_key), host="127.0.0.1",
                                port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the server did not start"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.service.close()
