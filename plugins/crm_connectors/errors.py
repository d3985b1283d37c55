"""Typed errors raised by the ActiveCampaign and Dataverse hooks (never carrying a credential)."""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

from urllib3.exceptions import NameResolutionError

from crm_connectors.redact import mask_emails

# getaddrinfo's answers that mean "this name does not exist" (not "try again later").
_NO_SUCH_NAME = {
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
}


class CrmApiError(Exception):
    """A call to a CRM API failed; carries the HTTP status, the API's error code and the endpoint.

    `endpoint` is the path without the query string, so no value a caller passed (an email in a
    filter, a paging token) ends up in the message. `body` is the decoded error body, for
    callers that read service-specific details; it is never part of the message.
    """

    #: The Airflow connection of the hook that made the call (set by the hook; None outside one).
    connection: str | None = None

    def __init__(
        self,
        message: str,
        *,
        service: str,
        method: str = "",
        endpoint: str = "",
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        body: object = None,
    ) -> None:
        self.message = mask_emails(message)
        self.body = body
        self.service = service
        self.method = method
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.retry_after = retry_after
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.method} {self.endpoint}".strip()
        status = f"HTTP {self.status}" if self.status is not None else "no response"
        code = f" [{self.code}]" if self.code else ""
        return f"{self.service} {where}: {status}{code}: {self.message}"

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again may succeed."""
        return False


class ClientError(CrmApiError):
    """The API rejected the request (4xx other than 401, 403, 404 and 429): not retried."""


class AuthenticationError(CrmApiError):
    """401 or 403: the credentials were refused or lack a privilege."""


class NotFoundError(ClientError):
    """404: the record, table or endpoint does not exist."""


class RateLimitError(CrmApiError):
    """429 (or a 503 that asks to retry later): wait `retry_after` seconds and try again."""

    @property
    def retryable(self) -> bool:
        return True


class ServerError(CrmApiError):
    """5xx: the service failed; retried unless the error code says it is not transient."""

    def __init__(self, message: str, *, transient: bool = True, **kwargs: object) -> None:
        self.transient = transient
        super().__init__(message, **kwargs)  # type: ignore[arg-type]

    @property
    def retryable(self) -> bool:
        return self.transient


class ApiConnectionError(CrmApiError):
    """No usable answer: refused, reset or dropped connection, or a timeout.

    `maybe_sent` is true when the request may have reached the server before the failure, so
    replaying a request that is not idempotent could apply it twice.
    """

    def __init__(self, message: str, *, maybe_sent: bool, **kwargs: object) -> None:
        self.maybe_sent = maybe_sent
        super().__init__(message, **kwargs)  # type: ignore[arg-type]

    @property
    def retryable(self) -> bool:
        return True


class UnknownHostError(CrmApiError):
    """The connection's host name does not exist (DNS: no such name). Never retried: the host
    is wrong, and sending again cannot make it resolve. A temporary DNS failure ("try again")
    stays an `ApiConnectionError`."""

    def __init__(self, host: str, **kwargs: object) -> None:
        self.host = host
        super().__init__(
            f"the host name '{host}' does not exist (DNS: no such name)",
            **kwargs,  # type: ignore[arg-type]
        )


def unknown_host(exc: BaseException) -> str | None:
    """The host name when `exc` (from `requests`) is a "no such name" DNS failure, else None."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, NameResolutionError):
            reason = getattr(current, "_reason", None)
            if isinstance(reason, socket.gaierror) and reason.errno in _NO_SUCH_NAME:
                return str(getattr(current, "_host", "") or "")
            return None
        pending.extend([current.__cause__, current.__context__, getattr(current, "reason", None)])
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
    return None


class ConnectionSettingsError(ValueError):
    """The Airflow connection cannot be used as it is set (a missing field, an unusable host or
    CA file). Raised before any request; the message names the connection and what to change,
    never a credential."""


class InsecureConnectionError(ConnectionSettingsError):
    """The connection's URL is plain `http://` to a host that is not this machine: the
    credentials would cross the network in clear text, so nothing is sent."""


class TlsError(CrmApiError):
    """The server's TLS certificate could not be verified. Never retried, and verification is
    never switched off: trust the right certificate authority (the connection's `ca_bundle`)."""


_TLS_REASON = re.compile(
    r"(certificate verify failed[^'\")\]]*|hostname [^,)]+ doesn't match [^,)]+)"
)


def tls_failure(url: str, exc: Exception) -> str:
    """A clear message for a certificate that failed verification (the reason, never the URL's
    query, which may hold personal data)."""
    found = _TLS_REASON.search(str(exc))
    reason = found.group(1).strip() if found else "the server's certificate was refused"
    host = urlsplit(url).netloc or url
    return (
        f"TLS certificate verification failed for {host}: {reason}. Trust the certificate "
        "authority that signed it with the connection's ca_bundle extra (a PEM file); "
        "verification cannot be switched off"
    )


class PagingError(CrmApiError):
    """The API returned a page token that does not advance, which would page forever."""


class TieOrderError(PagingError):
    """The rows of one second (more than one page of them) could not be read exactly: the API
    pages them in an order that changes between requests, or ignored the filter that picks that
    second. Raised instead of returning a partial set."""


class BulkImportError(CrmApiError):
    """An ActiveCampaign bulk import did not finish (timed out or reported a failed batch)."""


class ChangeTrackingExpiredError(ClientError):
    """The Dataverse delta token has expired: read the whole table again (full sync)."""


class ChangeTrackingNotEnabledError(ClientError):
    """Change tracking is not enabled for the Dataverse table: poll on `modifiedon` instead."""


class UnknownColumnError(ValueError):
    """A mapped column does not exist in the Dataverse table."""

    def __init__(self, table: str, columns: list[str], known: list[str]) -> None:
        self.table = table
        self.columns = columns
        shown = ", ".join(sorted(known)[:40])
        super().__init__(
            f"Dataverse table '{table}' has no column {', '.join(repr(c) for c in columns)} "
            f"(logical names are lower case; known columns: {shown})"
        )
