"""The ActiveCampaign webhook receiver, served by the Airflow API server.

ActiveCampaign posts each event, form-encoded, to `/crm-sync-webhooks/activecampaign/<secret>`
(`python -m crm_sync webhooks install` registers that URL). The secret is the password of the
`activecampaign_webhook` connection, compared in constant time: a wrong one gets 401 and nothing
is stored. A good event is stored in the sync state store before the answer (a redelivery is
stored once), then an asset event on `activecampaign_webhook_events` wakes
`activecampaign_to_dynamics365`. AC never retries a failed delivery: an event the receiver
could not store (503) is left to the scheduled runs' polling.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

URL_PREFIX = "/crm-sync-webhooks"
# As crm_sync.webhooks and crm_sync.state (this module imports nothing of the sync at load).
WEBHOOK_CONN_ID = "activecampaign_webhook"
STATE_CONN_ID = "crm_sync_state"
WEBHOOK_ASSET = "activecampaign_webhook_events"  # as crm_sync.dag_factory.WEBHOOK_ASSET
# The receiver reads its two connections at most this often; the asset event fires at most this
# often (and once more after the last event of a burst), so a burst wakes the DAG once, not per
# event.
SETUP_TTL_SECONDS = 30.0
MISSING_SETUP_TTL_SECONDS = 5.0  # a missing or unusable connection is read again sooner
WAKE_INTERVAL_SECONDS = 1.0
MAX_BODY_BYTES = 64 * 1024  # AC's contact payloads are a few hundred bytes
REFUSED_LOG_INTERVAL_SECONDS = 60.0  # wrong secrets are logged at most this often, counted
STORED_LOG_INTERVAL_SECONDS = 60.0  # so are the events stored (each one at debug level)
LOST_LOG_INTERVAL_SECONDS = 60.0  # and the events not stored
# Once the state store could not be reached, one event at a time tries it again, and none for
# this long after a failed try: against a server that never answers, each try holds a thread of
# the API server for the connect timeout (the others are answered 503 at once).
STORE_RETRY_SECONDS = 5.0

log = logging.getLogger("crm_sync.webhooks")
app = FastAPI(title="CRM sync webhooks", docs_url=None, redoc_url=None, openapi_url=None)


class _HideSecret(logging.Filter):
    """Access-log lines show the receiver's path without the secret in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            URL_PREFIX in str(a) for a in record.args if isinstance(a, str)
        ):
            record.args = tuple(_masked_path(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str) and URL_PREFIX in record.msg:
            record.msg = _masked_path(record.msg)
        return True


def _masked_path(text: str) -> str:
    head, found, rest = text.partition(f"{URL_PREFIX}/activecampaign/")
    if not found:
        return text
    secret_end = next((i for i, ch in enumerate(rest) if ch in " ?\"'"), len(rest))
    return f"{head}{found}***{rest[secret_end:]}"


for _name in ("uvicorn.access", "gunicorn.access", "uvicorn.error", "airflow.api_fastapi"):
    logging.getLogger(_name).addFilter(_HideSecret())


class _MaskPathAfterwards:
    """Once the receiver has answered, the request's path in the shared ASGI scope loses the
    secret, so that the access log the API server writes after it (`http.access`) shows `***`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            if scope.get("type") == "http":
                scope["path"] = _masked_path(str(scope.get("path", "")))
                raw = scope.get("raw_path")
                if isinstance(raw, bytes):
                    scope["raw_path"] = _masked_path(raw.decode("latin-1")).encode("latin-1")


app.add_middleware(_MaskPathAfterwards)


# -- the receiver's setup and the store -----------------------------------------------------------
@dataclass(frozen=True)
class _Setup:
    """What the receiver reads from its connections; None where one is missing or unusable."""

    secret: str | None = field(repr=False)
    state_url: str | None = field(repr=False)  # may hold the database's password


_setup_cache: tuple[float, _Setup | None] = (float("-inf"), None)
_setup_lock = threading.Lock()


def _fresh_setup() -> _Setup | None:
    """The setup read less than its time-to-live ago, or None (then `_setup` reads it)."""
    read_at, setup = _setup_cache
    if setup is None:
        return None
    complete = setup.secret is not None and setup.state_url is not None
    ttl = SETUP_TTL_SECONDS if complete else MISSING_SETUP_TTL_SECONDS
    return setup if time.monotonic() - read_at < ttl else None


def _setup() -> _Setup:
    """The secret (the webhook connection's password) and the state store's URL, read from
    their connections at most once per time-to-live, not once per event."""
    global _setup_cache
    with _setup_lock:
        setup = _fresh_setup()
        if setup is not None:
            return setup
        from airflow.sdk import BaseHook
        from crm_sync.state import state_url_from_connection
        from crm_sync.webhooks import MIN_SECRET_LENGTH

        try:
            secret = BaseHook.get_connection(WEBHOOK_CONN_ID).password or None
        except Exception:  # no connection: the receiver answers 503 and says so
            secret = None
        if secret is not None and len(secret) < MIN_SECRET_LENGTH:
            log.error(
                "the password of connection '%s' is shorter than %d characters: not used",
                WEBHOOK_CONN_ID,
                MIN_SECRET_LENGTH,
            )
            secret = None
        try:
            state_url: str | None = state_url_from_connection(STATE_CONN_ID)
        except Exception as error:  # no state store: events are answered 503 (polling takes them)
            log.error(
                "connection '%s' could not be read (%s): events are answered 503",
                STATE_CONN_ID,
                type(error).__name__,
            )
            state_url = None
        setup = _Setup(secret, state_url)
        _setup_cache = (time.monotonic(), setup)
        return setup


@functools.cache
def _store_for(url: str) -> Any:
    from crm_sync.state import StateStore

    return StateStore.from_url(url)


class NoStateConnection(LookupError):
    """The state store's connection is missing or unusable."""


class StoreUnavailable(RuntimeError):
    """The state store could not be reached moments ago: not tried by this event."""


@dataclass
class _StoreHealth:
    """Whether a PostgreSQL state store was reachable at the last try. Once it was not, one
    event at a time tries it again (the others are answered 503 at once), and none for
    `STORE_RETRY_SECONDS` after a failed try."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    down: str | None = None  # why the last try failed (the error's type); None: reachable
    retry_at: float = float("-inf")
    trying: bool = False

    def admit(self) -> bool:
        """Whether this event may use the store (False: answer 503 without trying); True
        while the store is down makes the event the one that tries it again."""
        with self.lock:
            if self.down is None:
                return True
            if self.trying or time.monotonic() < self.retry_at:
                return False
            self.trying = True
            return True

    def result(self, failure: str | None) -> bool:
        """Record a try's outcome (`failure`: why the store could not be reached, or None);
        True when it brings the store back."""
        with self.lock:
            back = self.down is not None and failure is None
            self.down, self.trying = failure, False
            if failure is not None:
                self.retry_at = time.monotonic() + STORE_RETRY_SECONDS
            return back


_health: dict[str, _StoreHealth] = {}


def _unreachable(error: Exception) -> bool:
    """Whether `error` says the PostgreSQL server could not be reached (a refused or timed-out
    connection, a broken one, no pooled connection free in time). A deadlock or a
    serialization failure carries the server's SQLSTATE: the next event simply tries again."""
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(error, PoolTimeout):
        return True
    if not isinstance(error, OperationalError):
        return False
    orig = error.orig
    return getattr(orig, "pgcode", None) is None and getattr(orig, "sqlstate", None) is None


def _store_event(state_url: str | None, event: Any) -> bool:
    """Store one event (False: a redelivery), then wake the DAG for a new one.

    Only a PostgreSQL store can be unreachable (SQLite is a local file: a locked database
    is contention, each event waits its turn): after a failed try, the events that come
    while one event tries it again, or within `STORE_RETRY_SECONDS`, get `StoreUnavailable`
    at once instead of each holding a thread of the API server for the connect timeout."""
    if state_url is None:
        raise NoStateConnection(f"no connection '{STATE_CONN_ID}'")
    remote = state_url.startswith("postgresql")
    health = _health.get(state_url) or _health.setdefault(state_url, _StoreHealth())
    if remote and not health.admit():
        raise StoreUnavailable(f"{health.down}, being tried again")
    try:
        new = bool(_store_for(state_url).enqueue_webhook(event))
    except Exception as error:
        if remote:
            health.result(type(error).__name__ if _unreachable(error) else None)
        raise
    if remote and health.result(None):
        lost.flush()  # the outage's last count, without waiting for another failure
    if new:
        try:
            waker.wake()
        except Exception:  # stored all the same: the next wake or the scheduled run takes it
            log.exception("could not wake the DAG for a stored webhook event")
    return new


def _expected(error: Exception) -> bool:
    """An outage of the store or its connection, not a defect of the receiver."""
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(error, (SQLAlchemyError, NoStateConnection, StoreUnavailable))


# -- waking the DAG --------------------------------------------------------------------------------
class _Waker:
    """Emits the asset event at most once per interval, and once after a burst's last event."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.lock = threading.Lock()
        self.last = float("-inf")
        self.timer: threading.Timer | None = None

    def wake(self) -> None:
        with self.lock:
            wait = self.last + self.interval - time.monotonic()
            if wait <= 0:
                self.last = time.monotonic()
            elif self.timer is None:
                self.timer = threading.Timer(wait, self._late)
                self.timer.daemon = True
                self.timer.start()
                return
            else:
                return
        _emit()

    def _late(self) -> None:
        with self.lock:
            self.timer = None
            self.last = time.monotonic()
        _emit()


def _emit() -> None:
    """An asset event on the webhook asset (as `POST /api/v2/assets/events` makes one)."""
    from airflow.assets.manager import asset_manager
    from airflow.models.asset import AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    try:
        with create_session() as session:
            asset = session.scalar(
                select(AssetModel).where(AssetModel.name == WEBHOOK_ASSET).limit(1)
            )
            if asset is None:
                log.error(
                    "asset '%s' is unknown to Airflow (is activecampaign_to_dynamics365 parsed?): "
                    "the events wait for the next scheduled run",
                    WEBHOOK_ASSET,
                )
                return
            asset_manager.register_asset_change(
                asset=asset, extra={"from": "activecampaign webhook"}, source_is_api=True,
                session=session,
            )  # fmt: skip
    except Exception:  # the events are stored: the next wake or the scheduled run takes them
        log.exception("could not emit the asset event for the stored webhook events")


waker = _Waker(WAKE_INTERVAL_SECONDS)


class _Tally:
    """Counts posts of one kind; logs the count at most once an interval (the first at once,
    then with the first post after each interval: the last count of a burst waits for the next
    post), so that a burst of events, or strangers' requests, cannot flood the log."""

    def __init__(self, interval: float, level: int, message: str) -> None:
        self.interval = interval
        self.level = level
        self.message = message
        self.lock = threading.Lock()
        self.count = 0
        self.logged = float("-inf")
        self.latest: tuple[object, ...] = ()

    def note(self, *latest: object) -> bool:
        """Count one post; `latest`: the message's other arguments, the last post's. True
        when this post logged the count."""
        with self.lock:
            self.count += 1
            self.latest = latest
            if time.monotonic() - self.logged < self.interval:
                return False
            count, self.count, self.logged = self.count, 0, time.monotonic()
        log.log(self.level, self.message, count, *latest)
        return True

    def flush(self) -> None:
        """Log the count not logged yet, if any, whatever the interval."""
        with self.lock:
            if not self.count:
                return
            count, self.count, self.logged = self.count, 0, time.monotonic()
        log.log(self.level, self.message, count, *self.latest)


refused = _Tally(
    REFUSED_LOG_INTERVAL_SECONDS,
    logging.WARNING,
    "webhook refused: wrong secret, %d request(s) (nothing stored)",
)
stored = _Tally(STORED_LOG_INTERVAL_SECONDS, logging.INFO, "webhooks: %d event(s) stored")
redelivered = _Tally(
    STORED_LOG_INTERVAL_SECONDS, logging.INFO, "webhooks: %d redelivery(ies) counted, not queued"
)
lost = _Tally(
    LOST_LOG_INTERVAL_SECONDS,
    logging.ERROR,
    "webhooks: %d event(s) not stored (the last: %s for contact %s, %s): answered 503; the "
    "next scheduled run polls for them",
)


# -- the endpoint ----------------------------------------------------------------------------------
@app.post("/activecampaign/{secret}")
async def receive(secret: str, request: Request) -> JSONResponse:
    """Store one ActiveCampaign event, then wake the DAG; 401 on a wrong secret.

    One trip to the thread pool per event: the setup is read there only when its time is up."""
    setup = _fresh_setup()
    if setup is None:
        setup = await run_in_threadpool(_setup)
    if setup.secret is None:
        return JSONResponse(
            {"detail": f"the receiver is not set up: no connection '{WEBHOOK_CONN_ID}'"}, 503
        )
    if not hmac.compare_digest(secret.encode(), setup.secret.encode()):
        refused.note()
        return JSONResponse({"detail": "unauthorized"}, 401)
    from crm_sync.webhooks import BadPayload, parse_form

    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            log.warning("webhook refused: a body over %d bytes (nothing stored)", MAX_BODY_BYTES)
            return JSONResponse({"detail": "payload too large"}, 413)
    form = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    try:
        event = parse_form(form)
    except BadPayload as error:
        log.warning("webhook ignored: %s", error)
        return JSONResponse({"detail": str(error)}, 400)
    try:
        new = await run_in_threadpool(_store_event, setup.state_url, event)
    except Exception as error:  # AC does not retry: polling is the safety net for this one
        reason = str(error) if isinstance(error, StoreUnavailable) else type(error).__name__
        log.debug(
            "webhook %s for contact %s not stored (%s)", event.event_type, event.contact_id, reason
        )
        logged = lost.note(event.event_type, event.contact_id, reason)
        if logged and not _expected(error):  # a defect, not an outage: show where
            log.error("the last webhook event not stored failed here", exc_info=error)
        return JSONResponse({"detail": "the sync state store is unavailable"}, 503)
    log.debug(
        "webhook %s for contact %s %s",
        event.event_type,
        event.contact_id,
        "stored" if new else "stored before (redelivery)",
    )
    (stored if new else redelivered).note()
    return JSONResponse({"stored": new})


class CrmSyncWebhooksPlugin(AirflowPlugin):
    """Registers the receiver."""

    name = "crm_sync_webhooks"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "CRM sync webhooks"}]
