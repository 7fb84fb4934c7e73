"""An OpenAI-compatible HTTP server in front of one deployment (stdlib ``http.server``).

Endpoints:

* ``POST /v1/chat/completions`` and ``POST /v1/completions``: the OpenAI request and response
  shapes (``n``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``logprobs``,
  ``stream`` with server-sent events for ``n=1``);
* ``GET /v1/models``: the one served model;
* ``POST /v1/hotload`` with ``{"snapshot": "sampler://<job>/<name>"}``: sync that sampler
  snapshot onto the deployment (its delta chain too); the next request sees the new weights;
* ``GET /health``: readiness and ``current_snapshot_identity``.

Requests are served one batch at a time per deployment (the engine is not re-entrant); a
hotload waits for the running request and the next one sees the new weights. Start it with
``scripts/serve.py`` or :class:`OpenAIServer`.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from training.sdk.deployments import (
    DeploymentError,
    DeploymentManager,
    DeploymentNotFoundError,
    DeploymentNotReadyError,
    HotloadError,
)
from training.sdk.store import CheckpointNotFoundError, StoreError
from training.sdk.types import SampledSequence, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["OpenAIServer"]

DEFAULT_MAX_TOKENS = 256
"""``max_tokens`` when a request sets none (OpenAI's is the context length)."""


class _RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status, self.error_type = status, error_type


class OpenAIServer:
    """Serve ``deployment_id`` of ``deploy_mgr`` over HTTP.

    Args:
        deploy_mgr, deployment_id: what to serve.
        model_name: the ``model`` name clients send and ``/v1/models`` lists (default: the
            deployment's base model); requests naming another model get a 404.
        host, port: where to listen; port 0 picks a free port (see :attr:`port`).
        default_job_id: the job a bare snapshot name in ``/v1/hotload`` belongs to.
    """

    def __init__(self, deploy_mgr: DeploymentManager, deployment_id: str, *,
                 model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                 default_job_id: str | None = None) -> None:
        self.deploy_mgr = deploy_mgr
        self.deployment_id = deployment_id
        self.model_name = model_name or deploy_mgr.get(deployment_id).base_model
        self.default_job_id = default_job_id
        self.httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL for OpenAI clients (``.../v1``)."""
        return f"http://{self.httpd.server_address[0]}:{self.port}/v1"

    def serve_forever(self) -> None:
        logger.info("serving %s (deployment %s) at %s", self.model_name, self.deployment_id,
                    self.url)
        self.httpd.serve_forever(poll_interval=0.1)

    def start(self) -> OpenAIServer:
        """Serve from a daemon thread; returns self (stop with :meth:`shutdown`)."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True,
                                        name=f"openai-server-{self.port}")
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ request handling
    def _deployment(self):
        return self.deploy_mgr.get(self.deployment_id)

    def _params(self, body: dict[str, Any]) -> tuple[SamplingParams, int]:
        model = body.get("model")
        if model is not None and model not in (self.model_name, self.deployment_id):
            raise _RequestError(HTTPStatus.NOT_FOUND, f"model {model!r} is not served here; "
                                f"this server serves {self.model_name!r}", "model_not_found")
        n = int(body.get("n") or 1)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        try:
            params = SamplingParams(
                max_tokens=int(max_tokens or DEFAULT_MAX_TOKENS),
                temperature=float(body.get("temperature", 1.0)),
                top_p=float(body.get("top_p", 1.0)), seed=body.get("seed"),
                stop=body.get("stop"))
        except (TypeError, ValueError) as e:
            raise _RequestError(HTTPStatus.BAD_REQUEST, str(e), "invalid_request_error") from e
        if n < 1:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"n must be >= 1, got {n}",
                                "invalid_request_error")
        return params, n

    def _visible_text(self, tokens: list[int], params: SamplingParams) -> str:
        """What OpenAI returns: special tokens dropped, cut before the first stop string."""
        text = self._deployment().tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in params.stop_strings() if s and s in text]
        return text[:min(cuts)] if cuts else text

    def _prompt_tokens(self, path: str, body: dict[str, Any]) -> list[int]:
        tokenizer = self._deployment().tokenizer
        if path == "/v1/chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _RequestError(HTTPStatus.BAD_REQUEST, "'messages' must be a non-empty "
                                    "list of {role, content}", "invalid_request_error")
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=True, return_dict=False))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return prompt
        if not isinstance(prompt, str) or not prompt:
            raise _RequestError(HTTPStatus.BAD_REQUEST, "'prompt' must be one non-empty "
                                "string (or a list of token ids)", "invalid_request_error")
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The non-streaming response body of a (chat) completion request."""
        params, n = self._params(body)
        prompt = self._prompt_tokens(path, body)
        sequences = self._deployment().sample([prompt], params, n)[0]
        chat = path == "/v1/chat/completions"
        choices = [self._choice(i, seq, params, chat, body) for i, seq in enumerate(sequences)]
        completion_tokens = sum(len(s.tokens) for s in sequences)
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt) + completion_tokens}}

    def _choice(self, index: int, seq: SampledSequence, params: SamplingParams, chat: bool,
                body: dict[str, Any]) -> dict[str, Any]:
        text = self._visible_text(seq.tokens, params)
        tokenizer = self._deployment().tokenizer
        pieces = [tokenizer.decode([t]) for t in seq.tokens]
        if chat:
            logprobs = None
            if body.get("logprobs"):
                logprobs = {"content": [
                    {"token": p, "logprob": lp, "bytes": list(p.encode()), "top_logprobs": []}
                    for p, lp in zip(pieces, seq.logprobs or [], strict=True)]}
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs, "finish_reason": seq.stop_reason}
        logprobs = None
        if body.get("logprobs") is not None:
            offsets, total = [], 0
            for p in pieces:
                offsets.append(total)
                total += len(p)
            logprobs = {"tokens": pieces, "token_logprobs": seq.logprobs,
                        "top_logprobs": None, "text_offset": offsets}
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": seq.stop_reason}

    def stream(self, path: str, body: dict[str, Any], write) -> None:
        """Stream one completion as server-sent events (``write`` takes one event's bytes)."""
        params, n = self._params(body)
        if n != 1:
            raise _RequestError(HTTPStatus.BAD_REQUEST, "stream=true supports n=1 only",
                                "invalid_request_error")
        prompt = self._prompt_tokens(path, body)
        chat = path == "/v1/chat/completions"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        created = int(time.time())
        steps: queue.Queue = queue.Queue()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["seq"] = self._deployment().sample(
                    [prompt], params, 1, on_token=lambda toks: steps.put(toks[0]))[0][0]
            except Exception as e:  # noqa: BLE001  handed to the request thread, re-raised there
                outcome["error"] = e
            finally:
                steps.put(None)

        def event(delta_text: str | None, finish: str | None, first: bool = False) -> None:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if delta_text:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None,
                          "finish_reason": finish}
                obj = "text_completion"
            payload = {"id": ident, "object": obj, "created": created,
                       "model": self.model_name, "choices": [choice]}
            write(f"data: {json.dumps(payload)}\n\n".encode())

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        if chat:
            event(None, None, first=True)
        tokens: list[int] = []
        sent = ""
        while (token := steps.get()) is not None:
            tokens.append(token)
            text = self._visible_text(tokens, params)
            # Hold back an incomplete UTF-8 character until its last byte arrives.
            if not text.endswith("\ufffd") and len(text) > len(sent):
                event(text[len(sent):], None)
                sent = text
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
        seq: SampledSequence = outcome["seq"]
        final = self._visible_text(seq.tokens, params)
        event(final[len(sent):] if final.startswith(sent) else None, seq.stop_reason)
        write(b"data: [DONE]\n\n")

    def hotload(self, body: dict[str, Any]) -> dict[str, Any]:
        snapshot = body.get("snapshot") or body.get("model_path")
        if not isinstance(snapshot, str):
            raise _RequestError(HTTPStatus.BAD_REQUEST, "send {\"snapshot\": "
                                "\"sampler://<job_id>/<snapshot_name>\"}",
                                "invalid_request_error")
        loaded = self.deploy_mgr.sync(self.deployment_id, snapshot,
                                      default_job_id=self.default_job_id)
        return {"current_snapshot_identity":
                self.deploy_mgr.current_snapshot_identity(self.deployment_id),
                "loaded": loaded}

    def health(self) -> dict[str, Any]:
        deployment = self._deployment()
        return {"status": "ok" if deployment.ready else deployment.state.lower(),
                "deployment_id": self.deployment_id, "model": self.model_name,
                "current_snapshot_identity": deployment.current_snapshot_identity}


def _error_status(error: Exception) -> tuple[HTTPStatus, str]:
    if isinstance(error, _RequestError):
        return error.status, error.error_type
    if isinstance(error, (CheckpointNotFoundError, DeploymentNotFoundError)):
        return HTTPStatus.NOT_FOUND, "not_found_error"
    if isinstance(error, DeploymentNotReadyError):
        return HTTPStatus.SERVICE_UNAVAILABLE, "deployment_not_ready"
    if isinstance(error, HotloadError):
        return HTTPStatus.CONFLICT, "hotload_refused"
    if isinstance(error, (ValueError, DeploymentError, StoreError)):
        return HTTPStatus.BAD_REQUEST, "invalid_request_error"
    return HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"


def _handler_for(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
            logger.debug("%s " + format, self.address_string(), *args)

        def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _fail(self, error: Exception) -> None:
            status, error_type = _error_status(error)
            if status == HTTPStatus.INTERNAL_SERVER_ERROR:
                logger.exception("request %s failed", self.path)
            self._send_json(status, {"error": {"message": str(error), "type": error_type,
                                               "param": None, "code": None}})

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            try:
                if self.path == "/v1/models":
                    self._send_json(HTTPStatus.OK, {"object": "list", "data": [
                        {"id": server.model_name, "object": "model", "created": 0,
                         "owned_by": "homefire"}]})
                elif self.path == "/health":
                    self._send_json(HTTPStatus.OK, server.health())
                else:
                    raise _RequestError(HTTPStatus.NOT_FOUND, f"no route GET {self.path}",
                                        "not_found_error")
            except Exception as e:  # noqa: BLE001  every failure becomes an HTTP error reply
                self._fail(e)

        def do_POST(self) -> None:  # noqa: N802
            headers_sent = False
            try:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError as e:
                    raise _RequestError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {e}",
                                        "invalid_request_error") from e
                if self.path == "/v1/hotload":
                    self._send_json(HTTPStatus.OK, server.hotload(body))
                elif self.path in ("/v1/chat/completions", "/v1/completions"):
                    if body.get("stream"):
                        server._params(body)  # refuse bad requests before the 200 goes out
                        self.send_response(HTTPStatus.OK)
                        self.send_header("Content-Type", "text/event-stream")
                        self.send_header("Cache-Control", "no-cache")
                        self.end_headers()
                        headers_sent = True

                        def write(data: bytes) -> None:
                            self.wfile.write(data)
                            self.wfile.flush()

                        server.stream(self.path, body, write)
                    else:
                        self._send_json(HTTPStatus.OK, server.complete(self.path, body))
                else:
                    raise _RequestError(HTTPStatus.NOT_FOUND, f"no route POST {self.path}",
                                        "not_found_error")
            except Exception as e:  # noqa: BLE001  every failure becomes an HTTP error reply
                if headers_sent:
                    logger.exception("streamed request %s failed", self.path)
                    payload = {"error": {"message": str(e), "type": _error_status(e)[1]}}
                    self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                else:
                    self._fail(e)

    return Handler
