"""The server's futures, kept in SQLite so they outlive the process.

Every asynchronous request (create_model, forward_backward, optim_step, save_*, load_weights,
asample) gets a row when it is accepted and its result (or error) when it ran. So
``retrieve_future`` answers after a server restart, and a duplicate POST of the same
``(model_id, seq_id)`` returns the first one's future instead of running again. A request that
was accepted but had not finished when the process died is answered with an error that says so
(the model it ran on is gone with the process: resume from the last ``save_state``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["FutureRecord", "FutureStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY,
    model_id TEXT,
    seq_id INTEGER,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,             -- pending | done | failed
    content_type TEXT,
    payload BLOB,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS futures_by_seq ON futures (model_id, seq_id)
    WHERE model_id IS NOT NULL AND seq_id IS NOT NULL;
"""


@dataclass
class FutureRecord:
    request_id: str
    model_id: str | None
    seq_id: int | None
    kind: str
    status: str
    content_type: str | None
    payload: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload or b"null")


class FutureStore:
    """SQLite table of futures at ``path`` (one writer: this process; safe across threads)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._events: dict[str, threading.Event] = {}
        with self._lock:
            # Accepted before a restart and never finished: their model is gone.
            self._db.execute(
                "UPDATE futures SET status='failed', content_type='application/json', "
                "payload=?, finished_at=? WHERE status='pending'",
                (json.dumps({"error": "the trainer server restarted before this request ran; "
                                      "the model it was sent to is no longer loaded: resume "
                                      "from your last save_state", "category": "server"}),
                 time.time()))

    def create(self, kind: str, model_id: str | None = None,
               seq_id: int | None = None) -> tuple[str, bool]:
        """A new pending future, or the existing one of the same ``(model_id, seq_id)``;
        returns ``(request_id, created)``."""
        with self._lock:
            if model_id is not None and seq_id is not None:
                row = self._db.execute(
                    "SELECT request_id FROM futures WHERE model_id=? AND seq_id=?",
                    (model_id, seq_id)).fetchone()
                if row is not None:
                    return row[0], False
            request_id = f"req-{uuid.uuid4().hex}"
            self._db.execute(
                "INSERT INTO futures (request_id, model_id, seq_id, kind, status, created_at) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                (request_id, model_id, seq_id, kind, time.time()))
            self._events[request_id] = threading.Event()
            return request_id, True

    def finish(self, request_id: str, payload: bytes | Any,
               content_type: str = "application/json") -> None:
        """Store a result: bytes as they are (protobuf), anything else as JSON."""
        self._set(request_id, "done", payload, content_type)

    def fail(self, request_id: str, error: str, category: str = "user") -> None:
        """Store Tinker's ``{"error", "category"}`` failure (``user``, ``server`` or
        ``unknown``)."""
        self._set(request_id, "failed", {"error": error, "category": category},
                  "application/json")

    def _set(self, request_id: str, status: str, payload: Any, content_type: str) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        with self._lock:
            self._db.execute(
                "UPDATE futures SET status=?, content_type=?, payload=?, finished_at=? "
                "WHERE request_id=?", (status, content_type, data, time.time(), request_id))
            event = self._events.pop(request_id, None)
        if event is not None:
            event.set()

    def get(self, request_id: str) -> FutureRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT request_id, model_id, seq_id, kind, status, content_type, payload "
                "FROM futures WHERE request_id=?", (request_id,)).fetchone()
        return FutureRecord(*row) if row is not None else None

    def wait(self, request_id: str, timeout: float) -> FutureRecord | None:
        """The record once finished, or still pending after ``timeout`` seconds."""
        with self._lock:
            event = self._events.get(request_id)
        if event is not None:
            event.wait(timeout)
        return self.get(request_id)

    def last_seq(self, model_id: str) -> int | None:
        """The highest ``seq_id`` of ``model_id`` that has finished (ran or failed)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(seq_id) FROM futures WHERE model_id=? AND "
                                   "status != 'pending'", (model_id,)).fetchone()
        return row[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
