"""An OpenAI-compatible HTTP server in front of one deployment (FastAPI on uvicorn).

Endpoints:

* ``POST /v1/chat/completions`` and ``POST /v1/completions``: the OpenAI request and response
  shapes (``n``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``logprobs``,
  ``stream`` with server-sent events for ``n=1``);
* ``GET /v1/models``: the one served model;
* ``POST /v1/hotload`` with ``{"snapshot": "sampler://<job>/<name>"}``: sync that sampler
  snapshot onto the deployment (its delta chain too); the next request sees the new weights;
* ``GET /health``: readiness and ``current_snapshot_identity``.

Requests are accepted concurrently and served one batch at a time per deployment (the engine
is not re-entrant): the others wait their turn, none is refused. A hotload waits for the running
request and the next one sees the new weights. Start it with ``scripts/serve.py`` or
:class:`OpenAIServer`.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

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
MAX_N = 64
"""Most completions one request may ask for (``n``)."""
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


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
        import uvicorn

        self.deploy_mgr = deploy_mgr
        self.deployment_id = deployment_id
        self.model_name = model_name or deploy_mgr.get(deployment_id).base_model
        self.default_job_id = default_job_id
        # Bound here, so port 0 has its number before serving and a taken port fails at once.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self._host = host
        self._server = uvicorn.Server(uvicorn.Config(
            create_openai_app(self), log_level="warning", access_log=False,
            # Every request's compute waits its turn for the deployment: many may be pending.
            limit_concurrency=None, backlog=2048, timeout_keep_alive=30))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        """Base URL for OpenAI clients (``.../v1``)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/v1"

    def serve_forever(self) -> None:
        logger.info("serving %s (deployment %s) at %s", self.model_name, self.deployment_id,
                    self.url)
        self._server.run(sockets=[self._socket])

    def start(self) -> OpenAIServer:
        """Serve from a daemon thread once it accepts connections; returns self (stop with
        :meth:`shutdown`)."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True,
                                        name=f"openai-server-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start within 30 s")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()

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
        n = _integer(body, "n", 1, 1, MAX_N)
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        max_tokens = _integer(body, key, DEFAULT_MAX_TOKENS, 1, None)
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"'stop' must be a string or a list of "
                                f"strings, got {stop!r}", "invalid_request_error")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"'seed' must be an integer, got "
                                f"{seed!r}", "invalid_request_error")
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=float(body.get("temperature", 1.0)),
                top_p=float(body.get("top_p", 1.0)), seed=seed, stop=stop)
        except (TypeError, ValueError) as e:
            raise _RequestError(HTTPStatus.BAD_REQUEST, str(e), "invalid_request_error") from e
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
            for i, message in enumerate(messages):
                if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
                    role = message.get("role") if isinstance(message, dict) else message
                    raise _RequestError(HTTPStatus.BAD_REQUEST, f"messages[{i}].role is "
                                        f"{role!r}; expected one of {', '.join(CHAT_ROLES)}",
                                        "invalid_request_error")
            return self._within_context(list(tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False)))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return self._within_context(prompt)
        if not isinstance(prompt, str) or not prompt:
            raise _RequestError(HTTPStatus.BAD_REQUEST, "'prompt' must be one non-empty "
                                "string (or a list of token ids)", "invalid_request_error")
        if len(prompt) > 8 * self._context_length():  # never tokenize a huge string whole
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"the prompt ({len(prompt)} "
                                f"characters) is longer than the model's context of "
                                f"{self._context_length()} tokens", "context_length_exceeded")
        return self._within_context(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def _context_length(self) -> int:
        config = getattr(getattr(self._deployment().engine, "model", None), "config", None)
        return int(getattr(config, "max_position_embeddings", None) or 1 << 20)

    def _within_context(self, tokens: list[int]) -> list[int]:
        limit = self._context_length()
        if len(tokens) >= limit:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"the prompt has {len(tokens)} tokens; "
                                f"the model's context is {limit}", "context_length_exceeded")
        return tokens

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

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[bytes]:
        """One completion as server-sent events, one ``bytes`` per event (the request is
        checked before the first event)."""
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

        def event(delta_text: str | None, finish: str | None, first: bool = False) -> bytes:
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
            return f"data: {json.dumps(payload)}\n\n".encode()

        return self._events(run, steps, outcome, event, params, chat)

    def _events(self, run, steps: queue.Queue, outcome: dict[str, Any], event,
                params: SamplingParams, chat: bool) -> Iterator[bytes]:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            if chat:
                yield event(None, None, first=True)
            tokens: list[int] = []
            sent = ""
            while (token := steps.get()) is not None:
                tokens.append(token)
                text = self._visible_text(tokens, params)
                # Hold back an incomplete UTF-8 character until its last byte arrives.
                if not text.endswith("\ufffd") and len(text) > len(sent):
                    yield event(text[len(sent):], None)
                    sent = text
            worker.join()
            if "error" in outcome:
                raise outcome["error"]
            seq: SampledSequence = outcome["seq"]
            final = self._visible_text(seq.tokens, params)
            yield event(final[len(sent):] if final.startswith(sent) else None, seq.stop_reason)
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 (the 200 is out: report the error as an event)
            logger.exception("streamed request failed")
            payload = {"error": {"message": str(e), "type": _error_status(e)[1]}}
            yield f"data: {json.dumps(payload)}\n\n".encode()

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


def _integer(body: dict[str, Any], key: str, default: int, low: int,
             high: int | None) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"'{key}' must be an integer {bounds}, "
                            f"got {value!r}", "invalid_request_error")
    return value


def create_openai_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app of :class:`OpenAIServer` (OpenAI's error body on every failure)."""
    app = FastAPI(title="homefire OpenAI-compatible server", docs_url=None, redoc_url=None)

    def failure(error: Exception) -> Response:
        status, error_type = _error_status(error)
        if status == HTTPStatus.INTERNAL_SERVER_ERROR:
            logger.exception("request failed")
        return JSONResponse({"error": {"message": str(error), "type": error_type,
                                       "param": None, "code": None}}, status_code=status)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as e:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {e}",
                                "invalid_request_error") from e
        if not isinstance(body, dict):
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"the body must be a JSON object, got "
                                f"{type(body).__name__}", "invalid_request_error")
        return body

    async def known_error(_: Request, error: Exception) -> Response:
        return failure(error)

    for error_type in (_RequestError, DeploymentError, StoreError, ValueError, KeyError):
        app.add_exception_handler(error_type, known_error)

    @app.middleware("http")
    async def unexpected(request: Request, call_next: Any) -> Response:
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 (never a dropped connection: a JSON 500)
            return failure(e)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                            "created": 0, "owned_by": "homefire"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return server.health()

    @app.post("/v1/hotload")
    async def hotload(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(server.hotload, await body_of(request))

    async def completion(request: Request) -> Response:
        body = await body_of(request)
        path = request.url.path
        if body.get("stream"):
            # Checked (and the prompt tokenized) before the 200 goes out.
            events = await run_in_threadpool(lambda: server.stream(path, body))
            first = await run_in_threadpool(next, events, None)

            def rest() -> Iterator[bytes]:
                if first is not None:
                    yield first
                yield from events

            return StreamingResponse(rest(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await run_in_threadpool(server.complete, path, body))

    app.post("/v1/chat/completions")(completion)
    app.post("/v1/completions")(completion)
    return app
