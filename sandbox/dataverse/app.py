"""The Dataverse emulator as a FastAPI app: Web API, Entra ID endpoints and `/_sandbox` admin."""

from __future__ import annotations

import asyncio
import gzip
import re
import uuid
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox.admin import Controls, install_admin
from sandbox.credentials import load_or_create
from sandbox.dataverse.auth import ADMIN_USER_ID, Identity, TokenService, entra_router
from sandbox.dataverse.errors import DataverseError, segment_not_found, url_too_long
from sandbox.dataverse.formatting import RowFormatter, dumps
from sandbox.dataverse.limits import Limits, ServiceProtection
from sandbox.dataverse.schema import ENTITIES, Entity
from sandbox.dataverse.security import merged as merged_privileges
from sandbox.dataverse.settings import OrgSettings, OrgSettingsPatch, SettingsHolder
from sandbox.dataverse.store import Store
from sandbox.dataverse.webapi import ApiRequest, ApiResponse, Budget, WebApi, error_response
from sandbox.dataverse.writes import CLOSE_ACTIONS, Caller

GZIP_MIN_BYTES = 8192
# Worker threads for Web API requests: more than the concurrency limit (52), since a request
# spending its cost-model time sleeps in its thread and must not hold up the others.
WORKER_THREADS = 128
# Dataverse accepts GET URLs up to 32,768 characters (65,536 inside a $batch).
MAX_URL = 32_768
API_PATH = re.compile(r"/api/data/(v9\.[0-2])(?:/(.*))?", re.S)
_TEMPLATES = (
    (re.compile(r"\([^)]*\)"), "({key})"),
    (re.compile(r"^/[0-9a-fA-F-]{36}/"), "/{tenant}/"),
)


def route_template(path: str) -> str:
    """The path with row keys and the tenant id replaced, for the request counters."""
    for pattern, replacement in _TEMPLATES:
        path = pattern.sub(replacement, path)
    return path


class WebApiGate:
    """Serves `/api/data/...`: bearer token, service protection, then the Web API (in a thread),
    adding the headers every Dataverse response carries."""

    def __init__(
        self,
        app: ASGIApp,
        webapi: WebApi,
        tokens: TokenService,
        limiter: ServiceProtection,
        settings: SettingsHolder,
    ) -> None:
        self.app = app
        self.webapi = webapi
        self.tokens = tokens
        self.limiter = limiter
        self.settings = settings
        self._threads: anyio.CapacityLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/data/"):
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        diagnostics = _idle_headers(self.limiter)
        try:
            claims = self.tokens.verify(headers.get("authorization"))
            ticket = self.limiter.admit(claims["oid"])
        except DataverseError as exc:
            await _send(send, error_response(exc), request_id, diagnostics)
            return
        response: ApiResponse | None = None
        budget: Budget | None = None
        try:
            body = await _read_body(receive)
            latency = self.settings.current.latency_ms
            if latency:
                await asyncio.sleep(latency / 1000)
            # The server's clock starts once the request has arrived. A client that gives up
            # (timeout, disconnect) is not noticed: the handler runs on and commits.
            current = self.settings.current
            budget = Budget(current.write_cost_ms, current.server_timeout_s)
            match = API_PATH.fullmatch(scope["path"])
            url_length = len(scope.get("raw_path") or b"") + 1 + len(scope["query_string"])
            if url_length > MAX_URL:
                response = error_response(url_too_long(url_length, MAX_URL))
            elif match is None:
                segment = scope["path"].split("/")[3]
                response = error_response(segment_not_found(segment))
            else:
                request = ApiRequest(
                    method=scope["method"],
                    path=match.group(2) or "",
                    query=scope["query_string"].decode("utf-8"),
                    headers=headers,
                    body=body,
                    version=match.group(1),
                    user_id=claims["oid"],
                    budget=budget,
                )
                gzip_ok = "gzip" in headers.get("accept-encoding", "").lower()
                if self._threads is None:
                    self._threads = anyio.CapacityLimiter(WORKER_THREADS)
                response = await anyio.to_thread.run_sync(
                    self._answer, request, gzip_ok, limiter=self._threads
                )
        finally:
            # Nominal cost plus the time the cost model really spent.
            spent = budget.spent_ms if budget is not None else 0.0
            self.limiter.release(ticket, (response.cost_ms if response else 0.0) + spent)
        await _send(send, response, request_id, ticket.headers)

    def _answer(self, request: ApiRequest, gzip_ok: bool) -> ApiResponse:
        response = self.webapi.answer(request)
        if gzip_ok and len(response.body) >= GZIP_MIN_BYTES:
            # Pages of 5,000 full rows are megabytes of repetitive JSON; compressing them (as the
            # service does for clients that accept gzip) costs less than moving them over TLS.
            response.body = gzip.compress(response.body, compresslevel=1)
            response.headers["Content-Encoding"] = "gzip"
            response.headers["Vary"] = "Accept-Encoding"
        return response


def _idle_headers(limiter: ServiceProtection) -> dict[str, str]:
    limits = Limits.scaled(limiter.controls.limit_scale)
    return {
        "x-ms-ratelimit-burst-remaining-xrm-requests": str(limits.requests),
        "x-ms-ratelimit-time-remaining-xrm-requests": f"{limits.execution_ms / 1000:,.2f}",
        "x-ms-dop-hint": str(min(4, limits.concurrent)),
    }


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send(send: Send, response: ApiResponse, request_id: str, extra: dict[str, str]) -> None:
    headers = {
        **extra,
        **response.headers,
        "OData-Version": "4.0",
        "x-ms-service-request-id": request_id,
        "REQ_ID": request_id,
        "Content-Length": str(len(response.body)),
    }
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


class TokenLifetime(BaseModel):
    """Body of `PUT /_sandbox/token_lifetime`."""

    seconds: int = Field(ge=1, le=86_400)


def _admin_router(
    store: Store,
    settings: SettingsHolder,
    tokens: TokenService,
    webapi: WebApi,
) -> APIRouter:
    router = APIRouter(tags=["sandbox admin: Dataverse"])

    @router.put("/token_lifetime")
    def set_token_lifetime(body: TokenLifetime) -> dict[str, Any]:
        tokens.lifetime = body.seconds
        return {"seconds": tokens.lifetime}

    @router.post("/expire_tokens")
    def expire_tokens() -> dict[str, Any]:
        return {"expired": True, "generation": tokens.expire_all()}

    @router.get("/config")
    def get_config() -> OrgSettings:
        return settings.current

    @router.put("/config")
    def put_config(body: OrgSettingsPatch) -> OrgSettings:
        try:
            new = settings.merged(body)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        for entity_set, enabled in new.alternate_key.items():
            if enabled and "emailaddress1" not in ENTITIES[entity_set].columns:
                raise HTTPException(422, f"{entity_set} has no emailaddress1 column to key on")
            if enabled and not settings.current.alternate_key.get(entity_set):
                clashes = _duplicate_emails(store, entity_set)
                if clashes:
                    # Like Dataverse, a key cannot become active while duplicates exist.
                    raise HTTPException(
                        409,
                        f"cannot activate the emailaddress1 key on {entity_set}: "
                        f"{clashes} duplicate values",
                    )
        return settings.replace(new)

    @router.get("/privileges")
    def get_privileges() -> dict[str, str]:
        return settings.current.privileges

    @router.put("/privileges")
    def put_privileges(body: dict[str, str | None]) -> dict[str, str]:
        # {"prvWriteLead": null} takes a privilege away, {"prvReadLead": "Basic"} sets a depth.
        try:
            privileges = merged_privileges(settings.current.privileges, body)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return settings.replace(
            settings.current.model_copy(update={"privileges": privileges})
        ).privileges

    @router.get("/export/{entity_set}")
    def export(entity_set: str, request: Request, columns: str | None = None) -> Response:
        entity = _entity(entity_set)
        select = [c.strip() for c in columns.split(",")] if columns else None
        unknown = [name for name in select or [] if entity.by_json_name(name) is None]
        if unknown:
            raise HTTPException(422, f"unknown columns {unknown} for {entity_set}")
        formatter = RowFormatter(entity, select)
        names = formatter.sql_columns
        rows = store.conn().execute(
            f"SELECT {', '.join(names)} FROM {entity.entity_set} ORDER BY createdon, "
            f"{entity.primary_id}"
        )
        value = [formatter.format_tuple(r) for r in rows]
        body = dumps({"entity_set": entity_set, "count": len(value), "value": value})
        if "gzip" in request.headers.get("accept-encoding", "").lower():
            return Response(
                gzip.compress(body, compresslevel=1),
                media_type="application/json",
                headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
            )
        return Response(body, media_type="application/json")

    @router.patch("/rows/{entity_set}/{row_id}")
    def patch_row(entity_set: str, row_id: str, body: dict[str, Any]) -> Any:
        entity = _entity(entity_set)
        try:
            with store.transaction() as conn:
                existing = store.fetch(entity, row_id.lower())
                if existing is None:
                    raise HTTPException(404, f"no {entity.logical_name} {row_id}")
                values = webapi.writer.prepare(entity, body, creating=False)
                row = webapi.writer.update(conn, entity, existing, values, Caller(ADMIN_USER_ID))
        except DataverseError as exc:
            raise HTTPException(exc.status, exc.body()) from None
        return RowFormatter(entity, None).format(row)

    @router.post("/rows/{entity_set}", status_code=201)
    def create_row(entity_set: str, body: dict[str, Any]) -> Any:
        # Create a row "as a Dynamics user" (Sandbox Admin): the Web API's validation, lookups
        # written with `@odata.bind` ("parentcustomerid_account@odata.bind": "/accounts(<id>)").
        entity = _entity(entity_set)
        try:
            with store.transaction() as conn:
                values = webapi.writer.prepare(entity, body, creating=True)
                (row,) = webapi.writer.create(conn, entity, [values], Caller(ADMIN_USER_ID))
        except DataverseError as exc:
            raise HTTPException(exc.status, exc.body()) from None
        return RowFormatter(entity, None).format(row)

    @router.delete("/rows/{entity_set}/{row_id}")
    def delete_row(entity_set: str, row_id: str) -> dict[str, Any]:
        # Delete "as a Dynamics user", with the relationships' cascades (as the Web API's DELETE).
        entity = _entity(entity_set)
        with store.transaction() as conn:
            if store.fetch(entity, row_id.lower()) is None:
                raise HTTPException(404, f"no {entity.logical_name} {row_id}")
            webapi.writer.delete(conn, entity, row_id.lower(), Caller(ADMIN_USER_ID))
        return {"deleted": row_id.lower()}

    @router.post("/actions/{action}")
    def run_action(action: str, body: dict[str, Any]) -> dict[str, Any]:
        # WinOpportunity / LoseOpportunity "as a Dynamics user", same body as the Web API action.
        if action not in CLOSE_ACTIONS:
            raise HTTPException(404, f"unknown action {action}; use one of {sorted(CLOSE_ACTIONS)}")
        try:
            with store.transaction() as conn:
                closed = webapi.writer.close_opportunity(conn, action, body, Caller(ADMIN_USER_ID))
        except DataverseError as exc:
            raise HTTPException(exc.status, exc.body()) from None
        return {"opportunityid": closed}

    return router


def _entity(entity_set: str) -> Entity:
    entity = ENTITIES.get(entity_set)
    if entity is None:
        raise HTTPException(404, f"unknown entity set {entity_set}; use one of {sorted(ENTITIES)}")
    return entity


def _duplicate_emails(store: Store, entity_set: str) -> int:
    (count,) = (
        store.conn()
        .execute(
            f"SELECT COUNT(*) FROM (SELECT ci(emailaddress1) FROM {entity_set} "
            "WHERE emailaddress1 IS NOT NULL GROUP BY ci(emailaddress1) HAVING COUNT(*) > 1)"
        )
        .fetchone()
    )
    return int(count)


def create_app(
    data_dir: Path,
    *,
    limits: bool = True,
    limit_scale: float = 1.0,
    token_lifetime: int = 3600,
    base_url: str,
) -> FastAPI:
    """The emulator app for `base_url` (the environment URL, also the Entra authority host)."""
    creds = load_or_create(data_dir)
    base_url = base_url.rstrip("/")
    identity = Identity(creds.tenant_id, creds.client_id, creds.client_secret, base_url)
    store = Store(data_dir)
    settings = SettingsHolder(store)
    tokens = TokenService(store, identity, token_lifetime)
    controls = Controls(name="dataverse", limits_enabled=limits, limit_scale=limit_scale)
    limiter = ServiceProtection(controls)
    webapi = WebApi(store, settings, identity, base_url)

    app = FastAPI(
        title="Dataverse Web API + Entra ID emulator",
        description=(
            "Local stand-in for Dynamics 365 / Dataverse (leads, contacts, accounts, "
            "opportunities)."
        ),
    )
    app.include_router(entra_router(identity, tokens))

    def reset() -> None:
        store.clear_rows()
        settings.replace(OrgSettings())
        tokens.lifetime = tokens.default_lifetime
        limiter.reset()

    app.add_middleware(WebApiGate, webapi=webapi, tokens=tokens, limiter=limiter, settings=settings)
    install_admin(
        app,
        controls,
        reset=reset,
        templates=route_template,
        extra_routes=_admin_router(store, settings, tokens, webapi),
    )
    return app
