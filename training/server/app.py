"""The HTTP face of the trainer server: Tinker's ``/api/v1`` endpoints on FastAPI.

The endpoint table, the futures flow and what is not served are in ``docs/server.md``; the
protocol facts come from ``tinker`` 0.38's source. Errors are answered as Tinker's
``{"error", "category"}`` JSON (with a 4xx status where the request itself is refused), which the
client turns into ``RequestFailedError`` / ``ValueError`` and stays usable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from training.sdk.rest_client import RestClient
from training.sdk.store import StoreError
from training.server.service import (
    LOCAL_TENANT,
    PROTOBUF,
    RequestError,
    TrainerService,
    tenant_account,
)
from training.server.wire import WireError

logger = logging.getLogger("homefire.server")

__all__ = ["create_app"]

MAX_BODY_BYTES = 256 * 1024 * 1024
"""Largest request body accepted (a forward_backward of a few hundred thousand tokens)."""
RETRIEVE_WAIT_S = 40.0
"""How long ``retrieve_future`` holds a request open: the client gives up at 45 s."""

CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "parallel_fwdbwd_chunks": False,  # chunks in seq_id order, one at a time
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "sample_join_sampling_session": False,
    "custom_loss_server_side": False,
}
"""``/client/config``: the feature flags this server supports (see docs/server.md)."""


def _error(message: str, status: int, category: str = "user") -> JSONResponse:
    return JSONResponse({"error": message, "category": category, "detail": message},
                        status_code=status)


class _Guard:
    """Every request: the caller's tenant from ``X-API-Key`` (401 without a known key), the
    body size limit (413), a JSON 500 for an unexpected failure, and one log line.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` costs about a millisecond per
    request, four times per training step over the wire."""

    def __init__(self, app: Any, tenants: dict[str, str | None]) -> None:
        self.app = app
        self.tenants = tenants

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"").decode("latin-1") or None
        scope.setdefault("state", {})["tenant"] = (self.tenants.get(given) if self.tenants
                                                   else LOCAL_TENANT)
        status = 500

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if self.tenants and not path.endswith("/healthz") and given not in self.tenants:
            await _error("missing or wrong X-API-Key", 401)(scope, receive, send_and_note)
        elif int(headers.get(b"content-length") or 0) > MAX_BODY_BYTES:
            await _error(f"request body over {MAX_BODY_BYTES} bytes", 413)(
                scope, receive, send_and_note)
        else:
            try:
                await self.app(scope, receive, send_and_note)
            except Exception:  # noqa: BLE001 (never a bare 500 without a body)
                logger.exception("%s %s failed", scope["method"], path)
                await _error("internal server error (see the server log)", 500, "server")(
                    scope, receive, send_and_note)
        logger.info("%s %s %d %.1f ms", scope["method"], path, status,
                    1000 * (time.perf_counter() - started))


def create_app(service: TrainerService, api_key: str | Sequence[str] | None = None) -> FastAPI:
    """The ASGI app serving ``service``.

    With ``api_key`` (one key or several), every request but ``/healthz`` must carry one of
    them as ``X-API-Key``, and each key is a tenant: its sessions, models, samplers and runs are
    invisible to the other keys (their ids answer 404). Without, whoever can connect is the one
    tenant and sees every run of the store.
    """
    app = FastAPI(title="homefire trainer server", docs_url=None, redoc_url=None)
    rest = RestClient(service.store, service.capabilities)
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    app.add_middleware(_Guard, tenants={key: tenant_account(key) for key in keys})

    @app.exception_handler(RequestError)
    async def refused(_: Request, e: RequestError) -> JSONResponse:
        return _error(str(e), e.status)

    @app.exception_handler(WireError)
    async def undecodable(_: Request, e: WireError) -> JSONResponse:
        return _error(str(e), 400)

    @app.exception_handler(StoreError)
    async def store_error(_: Request, e: StoreError) -> JSONResponse:
        return _error(str(e.args[0]) if e.args else str(e), 404 if isinstance(e, KeyError)
                      else 400)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, e: ValueError) -> JSONResponse:
        return _error(str(e), 400)

    async def body_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise RequestError("the body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    api = "/api/v1"

    # ---- health, configuration, sessions
    @app.get(f"{api}/healthz")
    async def healthz() -> Response:
        if not service.ready.is_set():
            return _error("starting: loading the base models", 503, "server")
        return JSONResponse({"status": "ok"})

    @app.post(f"{api}/client/config")
    async def client_config() -> dict[str, Any]:
        return CLIENT_CONFIG

    @app.post(f"{api}/client/dynamic_config")
    async def dynamic_config() -> dict[str, Any]:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False,
                "sample_cancel_max_batch_size": 0}

    # ---- endpoints whose body is a JSON object, answered by the service method of the same
    # name for the caller's tenant
    def json_route(method: Any) -> Any:
        async def route(request: Request) -> Any:
            return method(await body_json(request), request.state.tenant)
        return route

    for name in ("create_session", "create_model", "get_info", "optim_step", "save_weights",
                 "save_weights_for_sampler", "load_weights", "weights_info",
                 "create_sampling_session", "asample"):
        app.post(f"{api}/{name}")(json_route(getattr(service, name)))
    # homefire's own clients (training/sdk/remote.py): not part of Tinker's protocol
    app.post(f"{api}/homefire/create_trainer")(json_route(service.create_trainer))

    @app.post(f"{api}/session_heartbeat")
    async def heartbeat() -> dict[str, Any]:
        return {"type": "session_heartbeat"}

    @app.post(f"{api}/telemetry")
    async def telemetry() -> dict[str, Any]:
        return {"status": "accepted"}

    @app.post(api + "/sessions/{session_id}/finish")
    async def finish(session_id: str, request: Request) -> dict[str, Any]:
        service.finish_session(session_id, request.state.tenant)
        return {"status": "ok"}

    # ---- the protobuf one, and the ones with ids in the path
    @app.post(f"{api}/forward_backward")
    async def forward_backward(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").startswith(PROTOBUF):
            return service.forward_backward(await request.body(), request.state.tenant)
        raise RequestError("forward_backward takes the ForwardBackwardRequest protobuf "
                           "(Content-Type: application/x-protobuf), as tinker 0.38 sends it")

    @app.get(api + "/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, request: Request) -> dict[str, Any]:
        return service.get_sampler(sampler_id, request.state.tenant)

    # ---- futures
    @app.post(f"{api}/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        body = await body_json(request)
        request_id = body.get("request_id")
        record = await asyncio.to_thread(service.futures.wait, str(request_id), RETRIEVE_WAIT_S)
        if record is None:
            return _error(f"unknown request_id {request_id!r}", 404)
        if record.status == "pending":
            return JSONResponse({"type": "try_again", "request_id": record.request_id,
                                 "queue_state": "active"})
        return Response(record.payload, media_type=record.content_type or "application/json")

    # ---- REST: runs and checkpoints
    @app.get(f"{api}/get_server_capabilities")
    async def capabilities() -> dict[str, Any]:
        return service.capabilities()

    @app.get(f"{api}/training_runs")
    async def training_runs(request: Request, limit: int = 20, offset: int = 0) -> Any:
        return rest.list_training_runs(limit, offset, account=request.state.tenant) \
            .result().model_dump(mode="json")

    @app.get(api + "/training_runs/{run_id}")
    async def training_run(run_id: str, request: Request) -> Any:
        service.check_run(run_id, request.state.tenant)
        return rest.get_training_run(run_id).result().model_dump(mode="json")

    @app.get(api + "/training_runs/{run_id}/checkpoints")
    async def checkpoints(run_id: str, request: Request) -> Any:
        service.check_run(run_id, request.state.tenant)
        return rest.list_checkpoints(run_id).result().model_dump(mode="json")

    @app.delete(api + "/training_runs/{run_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(run_id: str, kind: str, name: str, request: Request) -> Any:
        service.check_run(run_id, request.state.tenant)
        rest.delete_checkpoint(run_id, f"{kind}/{name}").result()
        return {}

    return app
