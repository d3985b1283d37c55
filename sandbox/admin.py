"""The `/_sandbox/` admin API shared by both emulators: reset, request counters, fault injection."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ADMIN_PREFIX = "/_sandbox"


class FaultSpec(BaseModel):
    """What the next `count` matching requests get instead of a normal answer."""

    kind: Literal["status", "latency", "drop"] = "status"
    count: int = Field(1, ge=1, le=100_000)
    status: int = Field(429, ge=400, le=599)
    retry_after: int | None = Field(None, ge=0, le=3600)
    seconds: float = Field(0.0, ge=0, le=600)
    path_prefix: str = ""
    method: str | None = None


class LimitsBody(BaseModel):
    """A change to the rate limits: on/off and a scale factor (omitted = unchanged)."""

    enabled: bool | None = None
    scale: float | None = Field(None, gt=0)


@dataclass
class Fault:
    """A queued fault and how many requests it still applies to."""

    spec: FaultSpec
    remaining: int


@dataclass
class Controls:
    """Per-emulator admin state: counters, queued faults, and whether limits are on."""

    name: str
    limits_enabled: bool = True
    limit_scale: float = 1.0
    counts: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    faults: deque[Fault] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, method: str, path: str, status: int) -> None:
        """Record one answered request."""
        with self.lock:
            self.counts[(method, path, status)] += 1

    def take_fault(self, method: str, path: str) -> FaultSpec | None:
        """The fault for this request, if one is queued for it (consumes one use)."""
        with self.lock:
            for fault in list(self.faults):
                spec = fault.spec
                if path.startswith(spec.path_prefix) and spec.method in (None, method):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self.faults.remove(fault)
                    return spec
        return None

    def snapshot(self) -> dict[str, Any]:
        """Counters as JSON: totals, by status, and one row per (method, path, status)."""
        with self.lock:
            rows = [
                {"method": m, "path": p, "status": s, "count": n}
                for (m, p, s), n in sorted(self.counts.items())
            ]
        by_status: Counter[str] = Counter()
        for row in rows:
            by_status[str(row["status"])] += row["count"]
        return {"total": sum(by_status.values()), "by_status": dict(by_status), "requests": rows}


def _route_path(path: str, templates: Callable[[str], str] | None) -> str:
    return templates(path) if templates else path


class FaultAndCounterMiddleware:
    """Counts every non-admin request and applies queued faults before the app sees it."""

    def __init__(
        self, app: ASGIApp, controls: Controls, templates: Callable[[str], str] | None = None
    ) -> None:
        self.app = app
        self.controls = controls
        self.templates = templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        label = _route_path(path, self.templates)
        status_holder: dict[str, int] = {"status": 0}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        fault = self.controls.take_fault(method, path)
        try:
            if fault is None:
                await self.app(scope, receive, counting_send)
            elif fault.kind == "latency":
                await asyncio.sleep(fault.seconds)
                await self.app(scope, receive, counting_send)
            elif fault.kind == "drop":
                # Start a response promising a body, then fail: the server closes the socket
                # mid-response, which the client sees as a dropped connection.
                status_holder["status"] = 0
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-length", b"100")],
                    }
                )
                raise ConnectionAbortedError("sandbox fault: connection dropped")
            else:
                await _fault_response(fault, counting_send)
        finally:
            self.controls.count(method, label, status_holder["status"])


async def _fault_response(fault: FaultSpec, send: Send) -> None:
    headers = [(b"content-type", b"application/json")]
    if fault.retry_after is not None:
        headers.append((b"retry-after", str(fault.retry_after).encode()))
    body = b'{"message":"sandbox injected fault"}'
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": fault.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install_admin(
    app: FastAPI,
    controls: Controls,
    reset: Callable[[], Awaitable[None] | None],
    templates: Callable[[str], str] | None = None,
    extra_routes: APIRouter | None = None,
) -> None:
    """Mount the admin API and the counting/fault middleware on an emulator app.

    `templates` turns a concrete path into its route template for the counters (e.g.
    `/api/3/contacts/7` -> `/api/3/contacts/{id}`); `extra_routes` adds emulator-specific admin
    endpoints under the same prefix.
    """
    router = APIRouter(prefix=ADMIN_PREFIX, tags=["sandbox admin"])

    @router.post("/reset")
    async def reset_all() -> dict[str, Any]:
        result = reset()
        if asyncio.iscoroutine(result):
            await result
        with controls.lock:
            controls.counts.clear()
            controls.faults.clear()
        return {"reset": controls.name}

    @router.get("/counters")
    async def counters() -> dict[str, Any]:
        return controls.snapshot()

    @router.delete("/counters")
    async def clear_counters() -> dict[str, Any]:
        with controls.lock:
            controls.counts.clear()
        return {"cleared": True}

    @router.post("/faults")
    async def add_fault(spec: FaultSpec) -> dict[str, Any]:
        with controls.lock:
            controls.faults.append(Fault(spec=spec, remaining=spec.count))
        return {"queued": spec.model_dump(), "pending": len(controls.faults)}

    @router.get("/faults")
    async def list_faults() -> dict[str, Any]:
        with controls.lock:
            return {
                "faults": [
                    {**f.spec.model_dump(), "remaining": f.remaining} for f in controls.faults
                ]
            }

    @router.delete("/faults")
    async def clear_faults() -> dict[str, Any]:
        with controls.lock:
            controls.faults.clear()
        return {"cleared": True}

    @router.get("/limits")
    async def get_limits() -> dict[str, Any]:
        return {"enabled": controls.limits_enabled, "scale": controls.limit_scale}

    @router.put("/limits")
    async def set_limits(body: LimitsBody) -> dict[str, Any]:
        if body.enabled is not None:
            controls.limits_enabled = body.enabled
        if body.scale is not None:
            controls.limit_scale = body.scale
        return {"enabled": controls.limits_enabled, "scale": controls.limit_scale}

    app.include_router(router)
    if extra_routes is not None:
        app.include_router(extra_routes, prefix=ADMIN_PREFIX)
    app.add_middleware(FaultAndCounterMiddleware, controls=controls, templates=templates)
