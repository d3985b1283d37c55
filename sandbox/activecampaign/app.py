"""The ActiveCampaign API v3 emulator as a FastAPI app: auth, rate limits, routes and admin."""

from __future__ import annotations

import hmac
import json
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox.activecampaign import ops
from sandbox.activecampaign.api import Emulator, build_api
from sandbox.activecampaign.imports import BLANK_READINGS, ImportQueue
from sandbox.activecampaign.ratelimit import SlidingWindow, TokenBucket, Trip, scaled_rate
from sandbox.activecampaign.store import (
    ACTING_AS,
    DATE_READINGS,
    ApiError,
    Store,
    iso,
    parse_when,
)
from sandbox.activecampaign.webhooks import WebhookDispatcher
from sandbox.activecampaign.webhooks import admin_routes as webhook_admin_routes
from sandbox.admin import Controls, install_admin
from sandbox.credentials import load_or_create

FORBIDDEN = b'{"message":"Forbidden"}'
TOO_MANY = b'{"message":"Too Many Requests"}'
UNAVAILABLE = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    b"<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n</body>\r\n</html>\r\n"
)
TYPE_TAGS = {"lead": "D365: Lead", "contact": "D365: Contact"}
PULLED_FROM_AC = "D365: Pulled from ActiveCampaign"


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _too_many(send: Send, seconds: int, headers: list[tuple[bytes, bytes]]) -> None:
    retry = [(b"retry-after", str(seconds).encode())]
    await _send_json(send, 429, TOO_MANY, retry + headers)


async def _unavailable(send: Send) -> None:
    """The 503 users report when over the limit (mediatoolkit/activecampaign-v3-php#18,
    elementor/elementor#16369); its body is UNCONFIRMED: a front proxy's HTML page here."""
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"text/html"),
                (b"content-length", str(len(UNAVAILABLE)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": UNAVAILABLE})


class ActingAs:
    """`X-Sandbox-Source: admin` (or `public`, `system`) makes a request's writes come from a
    user in AC's UI (a contact, an automation) instead of the API: the webhooks' `initiated_from`,
    which decides who hears them. Sandbox only: tests act as a marketer through it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        source = ""
        if scope["type"] == "http":
            source = dict(scope["headers"]).get(b"x-sandbox-source", b"").decode("latin-1")
        if source not in ops.WEBHOOK_SOURCES:
            await self.app(scope, receive, send)
            return
        token = ACTING_AS.set(source)
        try:
            await self.app(scope, receive, send)
        finally:
            ACTING_AS.reset(token)


class ApiGate:
    """Before `/api/`: the `Api-Token` check (403), then the account's 5/s limit (429).

    Before the bucket: a hold (a fixed `Retry-After` not yet over: 429 with the seconds left),
    then the queued trips of the limit (429 or 503), both whether limits are on or off. The
    limit is read from the admin controls on every request, so tests can switch it at runtime;
    admin routes never pass through here.
    """

    def __init__(self, app: ASGIApp, emulator: Emulator, token: str) -> None:
        self.app = app
        self.emulator = emulator
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        supplied = next((value for key, value in scope["headers"] if key == b"api-token"), b"")
        if not hmac.compare_digest(supplied, self.token):
            await _send_json(send, 403, FORBIDDEN, [])
            return
        emu, now = self.emulator, time.monotonic()
        controls = emu.controls
        rate, capacity = scaled_rate(controls.limit_scale)
        refused = [(b"ratelimit-limit", str(math.floor(capacity)).encode())]
        refused.append((b"ratelimit-remaining", b"0"))
        if held := emu.overload.held_for(now):
            await _too_many(send, held, refused)
            return
        tripped = emu.overload.take()
        if tripped == 503:
            await _unavailable(send)
            return
        if tripped is not None:
            await _too_many(send, emu.throttle_seconds(1, now), refused)
            return
        if not controls.limits_enabled:
            await self.app(scope, receive, send)
            return
        decision = emu.bucket.take(rate, capacity, now)
        limit_headers = [
            (b"ratelimit-limit", str(decision.limit).encode()),
            (b"ratelimit-remaining", str(decision.remaining).encode()),
        ]
        if not decision.allowed:
            await _too_many(send, emu.throttle_seconds(decision.retry_after, now), limit_headers)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *limit_headers]
            await send(message)

        await self.app(scope, receive, send_with_limits)


_NUMERIC_SEGMENT = re.compile(r"/\d+(?=/|$)")


def route_template(path: str) -> str:
    """A concrete API path as its route template, for the counters (`/contacts/7` -> `{id}`)."""
    if path.startswith("/api/3/"):
        return "/api/3" + _NUMERIC_SEGMENT.sub("/{id}", path[len("/api/3") :])
    return path


class AutomationBody(BaseModel):
    """Which contacts reach the automation step, which step (lead or contact), and when."""

    contact_ids: list[int | str] = Field(min_length=1)
    type: Literal["lead", "contact"]
    # The second the run happened (ISO 8601; no offset = the account's zone); default now.
    at: str | None = None


class OrderingBody(BaseModel):
    """How rows equal on the sorted column are ordered: AC's way, or by id."""

    ties: Literal["shuffled", "stable"]


class ThrottleBody(BaseModel):
    """The `Retry-After` of an over-the-limit 429: null = the seconds until the bucket has a
    token again; a number (AC's documented example is 30) = that, and the account is refused
    for as long (a client that retries early is refused again, with the seconds left)."""

    retry_after: int | None = Field(None, ge=1, le=3600)


class TripBody(BaseModel):
    """Trip the account's limit: after `after` more API requests, the next `count` get `status`
    (429 with the throttle's Retry-After, or 503), whether limits are on or off."""

    status: Literal[429, 503] = 429
    after: int = Field(0, ge=0)
    count: int = Field(1, ge=1, le=100_000)


class DateFiltersBody(BaseModel):
    """How `filters[created_*|updated_*]` read their value (`store.DATE_READINGS`)."""

    reading: Literal["date", "timestamp", "local"]


class ImportBlanksBody(BaseModel):
    """How a bulk import treats an empty value (`imports.BLANK_READINGS`), and where the
    positions in a refused import's `failureReasons` count from."""

    blanks: Literal["ignore", "clear"] | None = None
    index_base: Literal[0, 1] | None = None


class ImportLimitBody(BaseModel):
    """Bulk-import requests allowed per minute; null = the default (100 x limit scale)."""

    per_minute: int | None = Field(None, ge=1)


def export_contacts(store: Store) -> bytes:
    """Every contact with its tag names and custom field values keyed by perstag, as JSON."""
    db = store.conn()
    tags: dict[int, list[str]] = {}
    for contact_id, name in db.execute(
        "SELECT ct.contact_id, t.tag FROM contact_tags ct JOIN tags t ON t.id = ct.tag_id"
        " ORDER BY ct.id"
    ):
        tags.setdefault(contact_id, []).append(name)
    fields: dict[int, dict[str, str]] = {}
    for contact_id, perstag, value in db.execute(
        "SELECT fv.contact_id, f.perstag, fv.value FROM field_values fv"
        " JOIN fields f ON f.id = fv.field_id"
    ):
        fields.setdefault(contact_id, {})[perstag] = value
    contacts = [
        {
            "id": str(cid),
            "email": email,
            "firstName": first,
            "lastName": last,
            "phone": phone,
            "cdate": iso(cdate),
            "udate": iso(udate),
            "tags": tags.get(cid, []),
            "fields": fields.get(cid, {}),
        }
        for cid, email, first, last, phone, cdate, udate in db.execute(
            "SELECT id, email, first_name, last_name, phone, cdate, udate FROM contacts ORDER BY id"
        )
    ]
    return json.dumps({"total": len(contacts), "contacts": contacts}, ensure_ascii=False).encode()


def admin_routes(emu: Emulator) -> APIRouter:
    """The emulator's own admin endpoints (mounted under `/_sandbox`)."""
    router = APIRouter(tags=["sandbox admin"])

    @router.post("/automation")
    def automation(body: AutomationBody) -> dict[str, Any]:
        ids = [number for value in body.contact_ids if (number := ops.as_int(value)) is not None]
        at = parse_when(body.at) if body.at is not None else None
        if body.at is not None and at is None:
            raise HTTPException(422, "at: not an ISO 8601 date or datetime")
        with emu.store.write(source="system") as tx:
            tx.at = at
            result = ops.apply_automation(tx, ids, TYPE_TAGS[body.type], PULLED_FROM_AC)
        return {"type": body.type, **result}

    @router.get("/contacts/export")
    def export() -> Response:
        return Response(export_contacts(emu.store), media_type="application/json")

    router.include_router(webhook_admin_routes(emu.webhooks))

    @router.get("/ordering")
    def get_ordering() -> dict[str, Any]:
        return {"ties": emu.ties}

    @router.put("/ordering")
    def set_ordering(body: OrderingBody) -> dict[str, Any]:
        emu.ties = body.ties
        return {"ties": emu.ties}

    def throttle() -> dict[str, Any]:
        held = emu.overload.held_for(time.monotonic())
        return {"retry_after": emu.throttle_retry_after, "held_for": held}

    @router.get("/limits/throttle")
    def get_throttle() -> dict[str, Any]:
        return throttle()

    @router.put("/limits/throttle")
    def set_throttle(body: ThrottleBody) -> dict[str, Any]:
        emu.throttle_retry_after = body.retry_after
        return throttle()

    @router.post("/limits/trips")
    def add_trip(body: TripBody) -> dict[str, Any]:
        pending = emu.overload.add(Trip(body.status, body.after, body.count))
        return {"queued": body.model_dump(), "pending": pending}

    @router.get("/limits/trips")
    def list_trips() -> dict[str, Any]:
        return {"trips": emu.overload.pending(), **throttle()}

    @router.delete("/limits/trips")
    def clear_trips() -> dict[str, Any]:
        emu.overload.clear()
        return {"cleared": True}

    @router.get("/date_filters")
    def get_date_filters() -> dict[str, Any]:
        return {"reading": emu.date_filters}

    @router.put("/date_filters")
    def set_date_filters(body: DateFiltersBody) -> dict[str, Any]:
        emu.date_filters = body.reading
        return {"reading": emu.date_filters}

    def import_readings() -> dict[str, Any]:
        return {"blanks": emu.imports.blanks, "index_base": emu.import_index_base}

    @router.get("/imports")
    def get_import_readings() -> dict[str, Any]:
        return import_readings()

    @router.put("/imports")
    def set_import_readings(body: ImportBlanksBody) -> dict[str, Any]:
        if body.blanks is not None:
            emu.imports.blanks = body.blanks
        if body.index_base is not None:
            emu.import_index_base = body.index_base
        return import_readings()

    @router.get("/limits/bulk_import")
    def get_import_limit() -> dict[str, Any]:
        return {"per_minute": emu.import_limit(), "override": emu.imports_per_minute}

    @router.put("/limits/bulk_import")
    def set_import_limit(body: ImportLimitBody) -> dict[str, Any]:
        emu.imports_per_minute = body.per_minute
        emu.import_window.clear()
        return {"per_minute": emu.import_limit(), "override": emu.imports_per_minute}

    return router


def create_app(data_dir: Path, *, limits: bool = True, limit_scale: float = 1.0) -> FastAPI:
    """The emulator over the SQLite database in `data_dir` (created if missing)."""
    store = Store(data_dir)
    emu = Emulator(
        store=store,
        imports=ImportQueue(store),
        webhooks=WebhookDispatcher(store),
        controls=Controls(name="activecampaign", limits_enabled=limits, limit_scale=limit_scale),
        bucket=TokenBucket(),
        import_window=SlidingWindow(60.0),
    )
    store.on_commit = emu.webhooks.publish

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        emu.imports.start()
        emu.webhooks.start()
        yield
        emu.imports.stop()
        emu.webhooks.stop()

    app = FastAPI(
        title="ActiveCampaign API v3 (sandbox)", lifespan=lifespan, docs_url="/_sandbox/docs",
        redoc_url=None, openapi_url="/_sandbox/openapi.json",
    )  # fmt: skip
    app.state.emulator = emu

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    app.include_router(build_api(emu))
    app.add_middleware(ApiGate, emulator=emu, token=load_or_create(data_dir).ac_api_token)
    app.add_middleware(ActingAs)

    def reset() -> None:
        store.reset()
        emu.bucket.clear()
        emu.import_window.clear()
        emu.imports_per_minute = None
        emu.ties = "shuffled"
        emu.date_filters = DATE_READINGS[0]
        emu.imports.blanks = BLANK_READINGS[0]
        emu.import_index_base = 0
        emu.throttle_retry_after = None
        emu.overload.clear()
        emu.webhooks.clear()

    install_admin(
        app, emu.controls, reset=reset, templates=route_template, extra_routes=admin_routes(emu)
    )
    return app
