"""The request engine both hooks share: one session, a rate budget, tenacity retries, one log line."""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import os
import threading
import time
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

import requests
import tenacity
from airflow.providers.http.hooks.http import HttpHook
from urllib3.exceptions import NewConnectionError

from crm_connectors.errors import (
    ApiConnectionError,
    AuthenticationError,
    ClientError,
    ConnectionSettingsError,
    CrmApiError,
    InsecureConnectionError,
    NotFoundError,
    RateLimitError,
    ServerError,
    TlsError,
    UnknownHostError,
    tls_failure,
    unknown_host,
)
from crm_connectors.pacing import RateBudget
from crm_connectors.redact import install_library_log_masking, loggable_url
from crm_connectors.retry import RetryPolicy

# Standard logging, so the records reach whatever handles them (task log, pytest caplog).
log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP address) is this machine: `localhost`, 127.0.0.0/8, ::1."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def secure_url(host: str, *, what: str, schema: str | None = None, port: int | None = None) -> str:
    """The URL credentials may be sent to, from a connection's host (and schema and port).

    A host without a scheme means `https://` (unless `schema` says `http`). Plain `http://` is
    accepted only for a loopback host (the sandbox), with a warning; to any other host it raises
    `InsecureConnectionError`: the credentials would cross the network in clear text. `what`
    names the setting in messages (e.g. "connection 'activecampaign_default'").
    """
    text = (host or "").strip()
    if not text:
        raise ConnectionSettingsError(f"{what} has no host: set it to the service's https:// URL")
    wanted = (schema or "").strip().lower()
    if wanted and wanted not in ("http", "https"):
        raise ConnectionSettingsError(
            f"{what}: schema '{schema}' is not a URL scheme; leave it empty (https is used) "
            "or write the whole https:// URL in the host"
        )
    url = text if "://" in text else f"{wanted or 'https'}://{text}"
    if port:
        url = f"{url}:{port}"
    parts = urlsplit(url)
    name = parts.hostname or ""
    where = f"{name}:{parts.port}" if parts.port else name
    if parts.scheme not in ("http", "https") or not name:
        raise ConnectionSettingsError(
            f"{what}: '{parts.scheme}://{where}' is not an https:// URL with a host"
        )
    if parts.scheme == "http":
        if not is_loopback(name):
            raise InsecureConnectionError(
                f"{what} uses plain http to {where}: its credentials would be sent in clear "
                f"text, so nothing was sent. Use https://{where} (a host without a scheme means "
                "https); plain http is accepted only for a loopback host such as the sandbox"
            )
        log.warning("%s: plain http to loopback host %s (sandbox)", what, where)
    return url


class PinnedSession(requests.Session):
    """A session whose TLS trust is `verify` on every request.

    `requests` lets `REQUESTS_CA_BUNDLE` override a session's own `verify`; passing it on each
    request is the only setting the environment cannot override.
    """

    def __init__(self, verify: str | bool = True) -> None:
        super().__init__()
        self.pinned_verify = verify

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("verify", self.pinned_verify)
        return super().request(method, url, *args, **kwargs)


@dataclass
class CallStats:
    """What a hook has sent so far: calls (with their retries) and retries alone."""

    calls: int = 0
    retries: int = 0
    failures: int = 0


@dataclass
class _Trace:
    """One call's progress: when it started, retries so far, whether credentials were renewed."""

    started: float = field(default_factory=time.monotonic)
    retries: int = 0
    refreshed: bool = False


@dataclass(frozen=True)
class ErrorDetails:
    """The API's own error code and message, read from an error response body."""

    code: str | None
    message: str
    body: Any = None


class CrmHttpHook(HttpHook):
    """Base of the two CRM hooks: a reused session, pacing, retries and a log line per call."""

    service: ClassVar[str] = "crm"

    def __init__(
        self,
        conn_id: str,
        *,
        retry_policy: RetryPolicy | None = None,
        timeout: float = 120.0,
    ) -> None:
        super().__init__(method="GET", http_conn_id=conn_id)
        self.retry_policy = retry_policy or RetryPolicy()
        self.timeout = timeout
        self.stats = CallStats()
        self.budget = RateBudget(None)
        self._session: requests.Session | None = None
        self._session_lock = threading.Lock()
        self._stats_lock = threading.Lock()

    # -- connection ------------------------------------------------------------------------

    def get_conn(self) -> requests.Session:  # type: ignore[override]
        """The hook's one session, built from the Airflow connection on first use."""
        with self._session_lock:
            if self._session is None:
                connection = self.get_connection(self.http_conn_id)
                self._set_base_url(connection)
                # Extra `timeout`: seconds to wait for one response, for a slow network or API.
                if connection.extra_dejson.get("timeout"):
                    self.timeout = float(connection.extra_dejson["timeout"])
                session = PinnedSession(self._verify_setting(connection))
                self._configure_session_from_mount_adapters(session)
                self._configure(session, connection)
                install_library_log_masking()
                self._session = session
            return self._session

    def _set_base_url(self, connection: Any) -> None:
        """`base_url` from the connection: https unless the host is loopback (see `secure_url`).

        Replaces `HttpHook`'s rule, which makes a host without a scheme `http://`; SRV lookup
        (the `srv_lookup` extra) is not supported.
        """
        self.base_url = secure_url(
            connection.host or "",
            what=f"connection '{self.http_conn_id}'",
            schema=connection.schema,
            port=connection.port,
        )
        self._srv_lookup_enabled = False
        self._base_url_initialized = True

    def _verify_setting(self, connection: Any) -> str | bool:
        bundle = connection.extra_dejson.get("ca_bundle")
        if bundle and isinstance(bundle, str) and not os.path.exists(bundle):
            raise ConnectionSettingsError(
                f"connection '{self.http_conn_id}': the ca_bundle extra names a file that does "
                f"not exist ({bundle}): give the path of the PEM file of the CA to trust"
            )
        return bundle or True

    @abstractmethod
    def _configure(self, session: requests.Session, connection: Any) -> None:
        """Add the service's credentials and settings to a new session."""

    def close(self) -> None:
        """Close the session's pooled connections (the next call opens new ones)."""
        with self._session_lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one call ----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        json: Any = None,
        data: bytes | str | dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        replay_safe: bool | None = None,
    ) -> requests.Response:
        """Send one call, retried by the retry policy; raise a `CrmApiError` when it fails.

        `path` is relative to the connection's host, or an absolute URL (a paging link).
        `replay_safe` says whether a request that may already have reached the server can be
        sent again; it defaults to true for every method but POST.
        """
        session = self.get_conn()
        url = path if "://" in path else self.url_from_endpoint(path)
        safe = method.upper() != "POST" if replay_safe is None else replay_safe
        trace = _Trace()

        def before_sleep(state: tenacity.RetryCallState) -> None:
            trace.retries += 1
            error = state.outcome.exception() if state.outcome else None
            log.debug(
                "%s %s: retry %d after %s", method, loggable_url(url), trace.retries, _brief(error)
            )
            if error is not None:
                # A discarded error's traceback would tie this frame, and the response it ends
                # up holding, into a cycle that keeps a pooled socket open until GC runs.
                error.__traceback__ = None

        try:
            for attempt in self.retry_policy.retrying(replay_safe=safe, before_sleep=before_sleep):
                with attempt:
                    response = self._attempt(
                        session, method, url, trace, params=params, json=json, data=data,
                        headers=headers,
                    )  # fmt: skip
        except CrmApiError as error:
            error.connection = self.http_conn_id
            self._finish(
                method, url, params, error.status or type(error).__name__, trace, failed=True
            )
            raise
        self._finish(method, url, params, response.status_code, trace, failed=False)
        return response

    def _finish(
        self, method: str, url: str, params: Any, status: int | str, trace: _Trace, *, failed: bool
    ) -> None:
        """Log the call's one line and add it to the stats."""
        log.log(
            logging.WARNING if failed else logging.INFO,
            "%s %s -> %s in %.2f s, %d %s",
            method,
            loggable_url(_full_url(url, params)),
            status,
            time.monotonic() - trace.started,
            trace.retries,
            "retry" if trace.retries == 1 else "retries",
        )
        with self._stats_lock:
            self.stats.calls += 1
            self.stats.retries += trace.retries
            self.stats.failures += int(failed)

    def run(
        self,
        endpoint: str | None = None,
        data: dict[str, Any] | str | None = None,
        headers: dict[str, Any] | None = None,
        extra_options: dict[str, Any] | None = None,
        **request_kwargs: Any,
    ) -> requests.Response:
        """`HttpHook.run` (as `HttpOperator` calls it), sent through `request()`.

        The plain `HttpHook.run` would open a new session that sends the connection's login and
        password as Basic auth and its extras as headers; this one uses the hook's credentials.
        `data` is the query for GET and the body otherwise; `json=` is passed on.
        """
        if extra_options or set(request_kwargs) - {"json"}:
            raise ValueError("only endpoint, data, headers and json= are supported")
        query, body = (data, None) if self.method == "GET" else (None, data)
        return self.request(
            self.method,
            endpoint or "",
            params=query,  # type: ignore[arg-type]
            data=body,
            json=request_kwargs.get("json"),
            headers=headers,
        )

    def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        """`request()` and the decoded JSON body (None for an empty body)."""
        response = self.request(method, path, **kwargs)
        return response.json() if response.content else None

    def _attempt(
        self, session: requests.Session, method: str, url: str, trace: _Trace, **kwargs: Any
    ) -> requests.Response:
        """One attempt (plus one resend with fresh credentials after a 401, when possible)."""
        response = self._send(session, method, url, **kwargs)
        if response.status_code == 401 and not trace.refreshed and self._refresh_credentials():
            trace.refreshed = True
            trace.retries += 1
            response = self._send(session, method, url, **kwargs)
        self._observe(response)
        if response.status_code >= 400:
            error = self._error_for(response, method, url)
            # The error's traceback keeps this frame alive: drop `response` so that its socket
            # does not outlive the session.
            del response
            if error.retry_after is not None:
                self.budget.pause(error.retry_after)
            raise error
        return response

    def _send(
        self,
        session: requests.Session,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None,
        **kwargs: Any,
    ) -> requests.Response:
        parts = urlsplit(url)
        if parts.scheme != "https" and not (
            parts.scheme == "http" and is_loopback(parts.hostname or "")
        ):
            # A link the API returned (a next page) must not take the credentials off https.
            raise InsecureConnectionError(
                f"connection '{self.http_conn_id}': refused to send credentials to "
                f"{parts.scheme}://{parts.hostname}, which is not https"
            )
        self.budget.acquire()
        try:
            return session.request(
                method,
                url,
                headers={**self._auth_headers(), **(headers or {})},
                timeout=self.timeout,
                **kwargs,
            )
        except requests.exceptions.SSLError as exc:
            raise TlsError(
                tls_failure(url, exc), service=self.service, method=method, endpoint=_endpoint(url)
            ) from None
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            host = unknown_host(exc)
            if host is not None:
                raise UnknownHostError(
                    host or (parts.hostname or ""),
                    service=self.service,
                    method=method,
                    endpoint=_endpoint(url),
                ) from None
            raise ApiConnectionError(
                f"{type(exc).__name__}: the connection failed or was dropped",
                maybe_sent=not _never_sent(exc),
                service=self.service,
                method=method,
                endpoint=_endpoint(url),
            ) from None

    def _auth_headers(self) -> dict[str, str]:
        """Per-request credentials (a fresh bearer token); none by default."""
        return {}

    def _refresh_credentials(self) -> bool:
        """Drop cached credentials after a 401; true when a resend may now succeed."""
        return False

    def _observe(self, response: requests.Response) -> None:
        """Read service hints (such as a parallelism hint) from any response."""

    # -- errors ----------------------------------------------------------------------------

    @abstractmethod
    def _error_details(self, response: requests.Response) -> ErrorDetails:
        """The API's error code and message from an error response."""

    def _transient(self, status: int, code: str | None) -> bool:
        """Whether a 5xx with this error code is worth retrying."""
        return True

    def _error_for(self, response: requests.Response, method: str, url: str) -> CrmApiError:
        """The typed error for an error response."""
        details = self._error_details(response)
        status = response.status_code
        kwargs: dict[str, Any] = {
            "service": self.service,
            "method": method,
            "endpoint": _endpoint(url),
            "status": status,
            "code": details.code,
            "retry_after": parse_retry_after(response.headers.get("Retry-After")),
            "body": details.body,
        }
        if status == 429:
            return RateLimitError(details.message, **kwargs)
        if status >= 500:
            return ServerError(
                details.message, transient=self._transient(status, details.code), **kwargs
            )
        if status in (401, 403):
            return AuthenticationError(details.message, **kwargs)
        if status == 404:
            return NotFoundError(details.message, **kwargs)
        return ClientError(details.message, **kwargs)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None if unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _never_sent(exc: Exception) -> bool:
    """Whether a request failed before any byte could reach the server."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError)


def _endpoint(url: str) -> str:
    return loggable_url(url.split("?", 1)[0])


def _full_url(url: str, params: Any) -> str:
    if not params:
        return url
    return requests.Request("GET", url, params=params).prepare().url or url


def _brief(error: BaseException | None) -> str:
    if isinstance(error, CrmApiError):
        return f"{type(error).__name__} (status {error.status}, code {error.code})"
    return type(error).__name__
