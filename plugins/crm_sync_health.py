"""The "CRM sync" page in the Airflow UI: sync health, the quarantine, and retrying it.

An Airflow plugin: a FastAPI app that the API server mounts at `/crm-sync`, and a nav entry
(`external_views`) that shows it inside Airflow's UI at `/plugin/crm-sync`. It signs in with
Airflow's own authentication (the UI's `_token` cookie or a Bearer token): reading needs read
access (GET) to the three sync DAGs, retrying needs edit access (PUT) to them. The reads and the
retry write are in `crm_sync.health`; this module adds what Airflow knows (paused, next run).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, Field

URL_PREFIX = "/crm-sync"
STATE_CONN_ID = "crm_sync_state"  # as crm_sync.state.STATE_CONN_ID
TEMPLATES = "health_templates"  # next to crm_sync.health

log = logging.getLogger("crm_sync.health")
app = FastAPI(title="CRM sync health", docs_url=None, redoc_url=None, openapi_url=None)


class NotSignedIn(Exception):
    """No valid Airflow token came with a page request: send the browser to the login page."""


class StateStoreUnavailable(Exception):
    """The state store cannot be read: no `crm_sync_state` connection, or no answer from the
    database it names. The message says which, and holds no secret."""


class RetryRequest(BaseModel):
    """Which open quarantine entries to retry: these ids, or every entry with a reason that the
    page's filters show (of `direction`, matching `q`, as the page's query parameters)."""

    entry_ids: list[int] = Field(default_factory=list, max_length=10_000)
    reason: str | None = Field(default=None, max_length=64)
    direction: str | None = Field(default=None, max_length=64)
    q: str | None = Field(default=None, max_length=128)


@dataclass(frozen=True)
class Access:
    """The signed-in user and what they may do with the sync DAGs."""

    user: Any
    can_edit: bool


# -- authentication and permissions ----------------------------------------------------------------
def _allowed(user: Any, method: Literal["GET", "PUT"]) -> bool:
    """Whether the auth manager lets `user` do `method` on all three sync DAGs."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from airflow.models.dag import DagModel
    from crm_sync.health import DAG_IDS

    manager = get_auth_manager()
    return all(
        manager.is_authorized_dag(
            method=method,
            details=DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id)),
            user=user,
        )
        for dag_id in DAG_IDS
    )


async def _signed_in(request: Request) -> Any:
    """The user of the request's Bearer token or `_token` cookie (Airflow's own `get_user`)."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    credentials = await bearer_scheme(request)
    return await get_user(request, None, credentials)


async def reader(request: Request) -> Access:
    """A user who may read the sync DAGs; 401 (pages: the login page) or 403 otherwise."""
    try:
        user = await _signed_in(request)
    except HTTPException as error:
        if request.method == "GET" and request.url.path.rstrip("/").endswith(URL_PREFIX):
            raise NotSignedIn from error
        raise
    if not _allowed(user, "GET"):
        raise HTTPException(403, "reading the CRM sync page needs read access to the sync DAGs")
    return Access(user, _allowed(user, "PUT"))


async def editor(access: Annotated[Access, Depends(reader)]) -> Access:
    """A user who may edit the sync DAGs; 403 for one who may only read them."""
    if not access.can_edit:
        raise HTTPException(403, "retrying needs edit access to the sync DAGs")
    return access


@app.exception_handler(NotSignedIn)
async def _to_login(request: Request, _error: NotSignedIn) -> Response:
    from airflow.api_fastapi.app import get_auth_manager

    return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), 303)


@app.exception_handler(StateStoreUnavailable)
async def _unavailable(request: Request, error: StateStoreUnavailable) -> Response:
    """503: a readable page for the page, JSON for the CSV and the retry API."""
    headers = {"Cache-Control": "no-store", "Retry-After": "60"}
    if request.url.path.endswith(("/quarantine.csv", "/api/retry")):
        return JSONResponse({"detail": str(error)}, 503, headers=headers)
    root = request.scope.get("root_path", "").rstrip("/")
    return HTMLResponse(unavailable_page(str(error), root), 503, headers=headers)


def unavailable_page(message: str, root: str = "") -> str:
    """The page shown instead of the sync-health page while the state store cannot be read."""
    html: str = _template("unavailable.html").render(
        message=message, root=root, conn_id=STATE_CONN_ID, now=_when(datetime.now(UTC))
    )
    return html


# -- what the page reads ---------------------------------------------------------------------------
@functools.cache
def _store_for(url: str) -> Any:
    from crm_sync.state import StateStore

    return StateStore.from_url(url)


def store() -> Any:
    """The state store of the `crm_sync_state` connection (one engine per URL and process);
    `StateStoreUnavailable` when there is no such connection or its database does not answer."""
    from crm_sync.state import state_url_from_connection

    try:
        url = state_url_from_connection(STATE_CONN_ID)
    except Exception as error:
        raise StateStoreUnavailable(_connection_problem(error)) from error
    with _reading(url):
        return _store_for(url)


def _connection_problem(error: Exception) -> str:
    """Why the `crm_sync_state` connection gives no URL (its own values stay out)."""
    if type(error).__name__ == "AirflowNotFoundException":
        return (
            f"The Airflow connection '{STATE_CONN_ID}' is not defined: the page reads the sync "
            "state store through it. Add it (Admin > Connections, or an "
            f"AIRFLOW_CONN_{STATE_CONN_ID.upper()} variable) as the sync DAGs have it."
        )
    if isinstance(error, ValueError) and str(error).startswith(f"connection '{STATE_CONN_ID}':"):
        # state_url_from_connection's own message, which holds none of the connection's values
        return f"The Airflow connection '{STATE_CONN_ID}' cannot be used: {error}"
    return (
        f"The Airflow connection '{STATE_CONN_ID}' could not be read "
        f"({type(error).__name__}): the page reads the sync state store through it."
    )


def _safe_url(url: str) -> str:
    """The URL without its password (and without anything when it does not parse)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(a URL that does not parse)"


def _scrub(text: str, url: str) -> str:
    """`text` with the URL's password (raw and quoted) replaced by ***."""
    from urllib.parse import quote, unquote

    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:
        password = None
    secrets = {str(password), quote(str(password), safe=""), unquote(str(password))}
    for secret in sorted(secrets - {"", "None"}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@contextmanager
def _reading(url: str) -> Iterator[None]:
    """Turn a database that does not answer (or a URL SQLAlchemy cannot use) into
    `StateStoreUnavailable`, naming the database without its password."""
    from sqlalchemy.exc import ArgumentError, InterfaceError, NoSuchModuleError, OperationalError

    try:
        yield
    except (OperationalError, InterfaceError) as error:
        lines = str(error.orig).strip().splitlines()
        why = f"{type(error.orig).__name__}: {_scrub(lines[0], url)}" if lines else "no answer"
        raise StateStoreUnavailable(
            f"The sync state store of the Airflow connection '{STATE_CONN_ID}' "
            f"({_safe_url(url)}) is not reachable: {why}"
        ) from error
    except (ArgumentError, NoSuchModuleError) as error:
        raise StateStoreUnavailable(
            f"The Airflow connection '{STATE_CONN_ID}' does not hold a database URL SQLAlchemy "
            f"can use ({_safe_url(url)}, {type(error).__name__})."
        ) from error


@contextmanager
def _state(state: Any) -> Iterator[Any]:
    """`_reading` for a store already open: its database stopped answering."""
    with _reading(state.engine.url.render_as_string(hide_password=False)):
        yield state


def _host(conn_id: str) -> str | None:
    """The base URL of a connection's host; nothing else of the connection is read."""
    from airflow.sdk import BaseHook
    from crm_sync.health import base_url

    try:
        return base_url(BaseHook.get_connection(conn_id).host)
    except Exception:  # a missing connection: the page shows ids without links
        return None


def dag_states() -> dict[str, dict[str, Any]]:
    """Paused, schedule, next run and active runs of each sync DAG, from Airflow's metadata DB."""
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from crm_sync.health import DAG_IDS
    from sqlalchemy import func, select

    states: dict[str, dict[str, Any]] = {}
    with create_session() as session:
        for dag in session.scalars(select(DagModel).where(DagModel.dag_id.in_(DAG_IDS))):
            states[dag.dag_id] = {
                "paused": bool(dag.is_paused),
                "schedule": dag.timetable_description or dag.timetable_summary,
                "next_run": dag.next_dagrun_create_after,
                "active_runs": 0,
            }
        active = (
            select(DagRun.dag_id, func.count())
            .where(
                DagRun.dag_id.in_(DAG_IDS),
                DagRun.state.in_([DagRunState.QUEUED, DagRunState.RUNNING]),
            )
            .group_by(DagRun.dag_id)
        )
        for dag_id, count in session.execute(active):
            if dag_id in states:
                states[dag_id]["active_runs"] = int(count)
    return states


# -- formatting ------------------------------------------------------------------------------------
def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _span(delta: timedelta) -> str:
    seconds = int(abs(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _ago(value: datetime | None, now: datetime) -> str:
    return f"{_span(now - value)} ago" if value else ""


def _next_run_text(state: dict[str, Any] | None, now: datetime) -> str:
    if state is None:
        return "not parsed yet"
    if state["paused"]:
        return "will not run: paused"
    when: datetime | None = state["next_run"]
    if when is None:
        return "only when triggered"
    if when <= now:
        return "runs now (due)"
    return f"next run in {_span(when - now)} ({_when(when)} UTC)"


def _filters(request: Request) -> Any:
    from crm_sync.health import DIRECTIONS, QuarantineFilter

    params = request.query_params
    direction = params.get("direction") or None
    return QuarantineFilter(
        direction=direction if direction in DIRECTIONS else None,
        reason=(params.get("reason") or "")[:64] or None,
        search=(params.get("q") or "")[:128] or None,
    )


@functools.cache
def _template(name: str = "health.html") -> Any:
    from crm_sync import health
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    folder = Path(health.__file__).resolve().parent / TEMPLATES
    environment = Environment(
        loader=FileSystemLoader(folder), autoescape=select_autoescape(["html"])
    )
    return environment.get_template(name)


def _scope_text(filters: Any) -> str:
    """The filters besides the reason, in words: what a whole-reason retry also keeps to."""
    parts = []
    if filters.direction:
        parts.append(f"of {filters.direction}")
    if filters.search:
        parts.append(f"whose record id contains “{filters.search}”")
    return " ".join(parts)


# -- routes --------------------------------------------------------------------------------------
@app.get("/", response_class=HTMLResponse)
def page(request: Request, access: Annotated[Access, Depends(reader)]) -> HTMLResponse:
    """The sync-health page (503 with the reason while the state store cannot be read)."""
    now = datetime.now(UTC)
    state = store()
    states = dag_states()  # Airflow's metadata DB: its errors stay Airflow's
    filters = _filters(request)
    with _state(state):
        return _page(request, access, state, states, filters, now)


def _page(
    request: Request,
    access: Access,
    state: Any,
    states: dict[str, dict[str, Any]],
    filters: Any,
    now: datetime,
) -> HTMLResponse:
    """The page, from a store that answers (`page` checked it)."""
    from urllib.parse import urlencode

    from crm_sync import health
    from crm_sync.records import RECHECKED_EVERY_RUN

    ac_base, dv_base = _host("activecampaign_default"), _host("dynamics365_default")
    root = request.scope.get("root_path", "").rstrip("/")
    marks = [
        {
            "name": m.name,
            "direction": m.direction,
            "stream": m.name.removeprefix(f"{m.direction}:"),
            "value": _when(m.value),
            "age": _ago(m.updated_at, now),
        }
        for m in health.watermark_ages(state, now)
    ]
    dags = []
    for dag_id in health.DAG_IDS:
        dag_state = states.get(dag_id)
        dags.append(
            {
                "dag_id": dag_id,
                "direction": dag_id in health.DIRECTIONS,
                "paused": None if dag_state is None else dag_state["paused"],
                "schedule": None if dag_state is None else dag_state["schedule"],
                "active_runs": 0 if dag_state is None else dag_state["active_runs"],
                "next_run_text": _next_run_text(dag_state, now),
                "watermarks": [m for m in marks if m["direction"] == dag_id],
                "runs": [
                    {
                        "run_id": run.run_id,
                        "status": run.status,
                        "dry_run": run.dry_run,
                        "started": _when(run.started_at),
                        "took": _span(run.duration) if run.duration is not None else "",
                        "counts": sorted((k, v) for k, v in run.counts.items() if v),
                    }
                    for run in health.recent_runs(state, dag_id)
                ],
            }
        )
    trip = health.last_breaker_trip(state, health.DAG_IDS)
    hooks = state.webhook_stats()
    shown = health.quarantine_page(state, filters)
    reasons = health.quarantine_reasons(state)
    query = {k: v for k, v in request.query_params.items() if k in ("direction", "reason", "q")}
    retried = request.query_params.get("retried")
    context = {
        "now": _when(now),
        "root": root,
        "airflow_base": root.removesuffix(URL_PREFIX),
        "can_edit": access.can_edit,
        "flash": (
            f"{int(retried)} quarantined entr{'y' if retried == '1' else 'ies'} marked for retry: "
            "the next run of its direction tries them again."
            if retried and retried.isdigit()
            else ""
        ),
        "dags": dags,
        "webhooks": {
            "pending": hooks["pending"],
            "received": hooks["received_24h"],
            "duplicates": hooks["duplicates_24h"],
            "last": _when(hooks["last_received"]) if hooks["last_received"] else "",
            "last_ago": _ago(hooks["last_received"], now) if hooks["last_received"] else "",
            "oldest": _ago(hooks["oldest_pending"], now) if hooks["oldest_pending"] else "",
        },
        "trip": trip
        and {
            "dag_id": trip.dag_id,
            "run_id": trip.run_id,
            "when": _when(trip.finished_at or trip.started_at),
            "ago": _ago(trip.finished_at or trip.started_at, now),
            "step": (trip.plan or {}).get("failed_step", ""),
            "breaker": (trip.plan or {}).get("breaker", ""),
            "message": (trip.plan or {}).get("message", ""),
            "let_through": (trip.plan or {}).get("let_through", ""),
        },
        "other_watermarks": [m for m in marks if m["direction"] not in health.DIRECTIONS],
        "directions": health.DIRECTIONS,
        "reasons": reasons,
        "rechecked": sorted(RECHECKED_EVERY_RUN),
        "retry_reasons": [r for r in reasons if r not in RECHECKED_EVERY_RUN],
        "scope": _scope_text(filters),
        "filters": filters,
        "filtered": bool(query),
        "csv_url": f"{root}/quarantine.csv" + (f"?{urlencode(query)}" if query else ""),
        "total": shown.total,
        "truncated": shown.truncated,
        "quarantine": [
            {
                "id": q.id,
                "record_key": q.record_key,
                "direction_short": "→ Dynamics 365"
                if q.direction == "activecampaign_to_dynamics365"
                else "→ ActiveCampaign",
                "reasons": q.reasons,
                "email": q.email,
                "kind": q.kind,
                "dataverse_id": q.dataverse_id,
                "ac_id": q.ac_id,
                "dv_url": health.dynamics_record_url(dv_base, q.kind, q.dataverse_id),
                "ac_url": health.ac_record_url(ac_base, q.kind, q.ac_id),
                "first_seen": _when(q.first_seen),
                "last_seen": _when(q.last_seen),
                "attempts": q.attempts,
                "message": q.message,
                "retry_pending": q.retry_pending,
                "retried_every_run": q.retried_every_run,
            }
            for q in shown.rows
        ],
    }
    return HTMLResponse(_template().render(**context), headers={"Cache-Control": "no-store"})


@app.get("/quarantine.csv")
def quarantine_csv(request: Request, _access: Annotated[Access, Depends(reader)]) -> Response:
    """The (filtered) open quarantine as CSV, emails masked: streamed, a chunk of entries at a
    time (the first is read before answering, so a store that does not answer gives a 503)."""
    from crm_sync import health

    state = store()
    with _state(state):
        pieces = health.quarantine_csv_chunks(state, _filters(request))
        first = next(pieces)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        itertools.chain([first], pieces),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="crm-sync-quarantine-{stamp}.csv"',
            "Cache-Control": "no-store",
        },
    )


@app.post("/api/retry")
def retry(body: RetryRequest, _access: Annotated[Access, Depends(editor)]) -> dict[str, Any]:
    """Mark open entries for retry by the next run of their direction (JSON body only: a
    cross-site form cannot send one)."""
    from crm_sync import health

    if not body.entry_ids and not body.reason:
        raise HTTPException(422, "name entry_ids or a reason")
    if body.direction and body.direction not in health.DIRECTIONS:
        raise HTTPException(422, f"direction must be one of {', '.join(health.DIRECTIONS)}")
    search = (body.q or "").strip() or None
    state = store()
    with _state(state):
        marked = health.retry(
            state,
            entry_ids=body.entry_ids,
            reason=body.reason,
            direction=body.direction,
            search=search,
        )
    # Ids and reasons only: the record keys, the search and who asked stay out of the log.
    log.info(
        "sync-health: %d quarantine entries marked for retry "
        "(%d ids named, reason %s, direction %s, %s)",
        marked,
        len(body.entry_ids),
        body.reason or "-",
        body.direction or "all",
        "filtered by record id" if search else "no record-id filter",
    )
    return {"marked": marked}


class CrmSyncHealthPlugin(AirflowPlugin):
    """Registers the app and its nav entry."""

    name = "crm_sync_health"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "CRM sync health"}]
    external_views = [
        {
            "name": "CRM sync",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "url_route": "crm-sync",
        }
    ]
