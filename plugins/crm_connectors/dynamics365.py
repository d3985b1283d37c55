"""Airflow hook for the Dataverse Web API (Dynamics 365): MSAL auth, paging, bulk writes, deltas."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import requests

from crm_connectors.base import CrmHttpHook, ErrorDetails, PinnedSession, secure_url
from crm_connectors.entra import DEFAULT_AUTHORITY_HOST, TokenSource
from crm_connectors.errors import (
    ApiConnectionError,
    ChangeTrackingExpiredError,
    ChangeTrackingNotEnabledError,
    ClientError,
    ConnectionSettingsError,
    CrmApiError,
    NotFoundError,
    RateLimitError,
    ServerError,
    UnknownColumnError,
)
from crm_connectors.odata import all_of, any_of, check_filter, column, compare, literal
from crm_connectors.odata_batch import (
    MAX_BATCH_PARTS,
    BatchOperation,
    BatchResponse,
    build_batch,
    parse_batch_response,
)
from crm_connectors.pacing import ChunkSizer
from crm_connectors.paging import NextLinkPaginator, iterate_pages
from crm_connectors.redact import mask_emails
from crm_connectors.retry import RetryPolicy

log = logging.getLogger(__name__)

_Chunk = TypeVar("_Chunk")
_Result = TypeVar("_Result")

API = "/api/data/v9.2"
NS = "Microsoft.Dynamics.CRM"
MAX_PAGE_SIZE = 5000
MAX_CHUNK = 1000
# Bulk writes: the first chunk's rows, the answer time the chunk sizer aims at (at most a quarter
# of the client timeout), and how often one row may go unanswered before the run gives up.
FIRST_CHUNK = 100
BULK_TARGET_SECONDS = 30.0
# A bulk write with several workers splits its rows into requests of equal size, a multiple of
# the workers in number, so they end together instead of a short last round running on fewer
# workers (1,921 rows as 1,000 + 921 took 10 s of Dataverse time where 4.8 s do); no request
# is made smaller than this for the sake of it.
MIN_SHARE = 100
MAX_WRITE_ATTEMPTS = 6
CONCURRENCY_LIMIT = 52
DEFAULT_PARALLEL = 4

# `PrivilegeDepth`, shallowest first: the user's own records, its business unit, the unit and
# its children, the whole organisation.
PRIVILEGE_DEPTHS = ("Basic", "Local", "Deep", "Global")
# Service protection limits (429): which limit the error code names.
SERVICE_PROTECTION_CODES = {
    "0x80072322": "number of requests",
    "0x80072321": "combined execution time",
    "0x80072326": "concurrent requests",
}
# 5xx answers that report a decision, not an outage: sending them again cannot help.
NON_TRANSIENT_CODES = {"0x80040333"}  # duplicate detection
# The server ran out of time (its 2-minute limit: "SQL timeout expired") and rolled the request
# back. Not replayed as it was: a bulk write is sent again in smaller chunks.
SERVER_TIMEOUT_CODES = {"0x80044151"}
# A table without CreateMultiple / UpdateMultiple (not every table supports them): "The
# 'CreateMultiple' method does not support entities of type 'lead'".
BULK_UNSUPPORTED_CODES = {"0x80040800"}
_EXPIRED_DELTA = ("0x80044352", "version stamp associated with the client has expired")
_NO_CHANGE_TRACKING = ("0x80072491", "isn't enabled for change tracking")
_ENTITY_ID = re.compile(
    r"\(([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\)$"
)


@dataclass(frozen=True)
class WriteResult:
    """The outcome of one input row of a bulk write (`index` is its position in the input)."""

    index: int
    ok: bool
    id: str | None = None
    error_code: str | None = None
    message: str | None = None
    status: int | None = None


@dataclass(frozen=True)
class ColumnInfo:
    """One column of a table, from `EntityDefinitions`."""

    name: str
    type: str
    max_length: int | None = None
    valid_for_create: bool = True
    valid_for_update: bool = True


@dataclass(frozen=True)
class TableInfo:
    """A table's names, primary key and columns."""

    logical_name: str
    entity_set: str
    primary_id: str
    columns: dict[str, ColumnInfo] = field(default_factory=dict)

    def check_columns(self, names: Iterable[str]) -> None:
        """Raise `UnknownColumnError` naming every column in `names` the table lacks."""
        missing = sorted({n for n in names if n not in self.columns})
        if missing:
            raise UnknownColumnError(self.logical_name, missing, list(self.columns))


@dataclass(frozen=True)
class ChangePage:
    """One page of a change-tracking read: changed rows, deleted ids, and on the last page the
    delta link to store for the next read."""

    rows: list[dict[str, Any]]
    deleted_ids: list[str]
    delta_link: str | None = None


def even_share(rows: int, full: int, workers: int) -> int:
    """Rows per request for `rows` in requests of at most `full`, `workers` at a time: as many
    requests as full ones would take, rounded up to a multiple of `workers`, all of one size
    (at least `MIN_SHARE` unless `full` is smaller), so every round keeps each worker busy.
    While the chunk sizer is still growing, `_bulk` sends full chunks instead (it learns only
    from those) until the rows left no longer fill a round of them (`next_share`)."""
    if workers <= 1:
        return full
    requests = workers * math.ceil(math.ceil(rows / full) / workers)
    return max(math.ceil(rows / requests), min(MIN_SHARE, full))


def next_share(
    left: int, full: int, workers: int, *, measuring: bool, planned: int, share: int
) -> tuple[int, int]:
    """The rows of the next request and the chunk size its plan was made for (0: none).

    While the chunk sizer is measuring (`ChunkSizer.growing`), requests are full-size, as long
    as the `left` rows fill a round of them: the sizer learns only from those. Otherwise, and
    for a last round, the rows go in even shares (`even_share`), planned again when the full
    size moves or rows came back (`planned` 0), so that no round leaves workers idle."""
    if measuring and left >= workers * full:
        return full, 0
    if full != planned:
        return even_share(left, full, workers), full
    return share, planned


class Dynamics365Hook(CrmHttpHook):
    """Dataverse Web API v9.2 over one reused session, authenticated with MSAL.

    Connection (conn type `http`): `host` = the environment URL (`https://ORG.crm.dynamics.com`),
    `login` = the app's client id, `password` = its client secret; extras `tenant_id`, optional
    `authority_host` (default `https://login.microsoftonline.com`) and `ca_bundle` (a CA file to
    trust). The token scope is `<environment URL>/.default`.

    429 answers (service protection: too many requests, execution time, concurrency) wait
    `Retry-After` and pause every thread of the hook; 5xx and connection errors back off with
    jitter; a 401 renews the token and resends once. Bulk writes run at most
    `min(max_parallel, x-ms-dop-hint)` requests at a time.

    :param dynamics365_conn_id: the Airflow connection id.
    :param max_parallel: upper bound on concurrent requests of a bulk write (the server's
        `x-ms-dop-hint` sets the pace below it).
    :param retry_policy: attempts and backoff (see `RetryPolicy`).
    :param timeout: seconds to wait for one response.
    """

    conn_name_attr = "dynamics365_conn_id"
    default_conn_name = "dynamics365_default"
    conn_type = "http"
    hook_name = "Dynamics 365 (Dataverse)"
    service = "dynamics365"

    def __init__(
        self,
        dynamics365_conn_id: str = default_conn_name,
        *,
        max_parallel: int = 16,
        retry_policy: RetryPolicy | None = None,
        timeout: float = 120.0,
    ) -> None:
        super().__init__(dynamics365_conn_id, retry_policy=retry_policy, timeout=timeout)
        if not 1 <= max_parallel <= CONCURRENCY_LIMIT:
            raise ValueError(f"max_parallel must be between 1 and {CONCURRENCY_LIMIT}")
        self.dynamics365_conn_id = dynamics365_conn_id
        self.max_parallel = max_parallel
        self.dop_hint: int | None = None
        self.tokens: TokenSource | None = None
        self._tables: dict[str, TableInfo] = {}
        self._tables_lock = threading.Lock()
        self.first_chunk = FIRST_CHUNK
        self._sizers: dict[str, ChunkSizer] = {}
        self._no_bulk_actions: set[str] = set()
        # Per thread: the chunk sizer of the bulk write in progress (None outside one).
        self._writing = threading.local()

    # -- connection and auth -------------------------------------------------------------------

    def _configure(self, session: requests.Session, connection: Any) -> None:
        extras = connection.extra_dejson
        missing = [
            name
            for name, value in (
                ("login (client id)", connection.login),
                ("password (client secret)", connection.password),
                ("extra tenant_id", extras.get("tenant_id")),
            )
            if not value
        ]
        if missing:
            raise ConnectionSettingsError(
                f"connection '{self.dynamics365_conn_id}' lacks {', '.join(missing)}: add it "
                "(the app registration's client id and secret, and the Entra ID tenant)"
            )
        authority_host = secure_url(
            extras.get("authority_host") or DEFAULT_AUTHORITY_HOST,
            what=f"connection '{self.dynamics365_conn_id}' (extra authority_host)",
        )
        self.base_url = self.base_url.rstrip("/")
        session.headers.update(
            {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
        )
        self.tokens = TokenSource(
            client_id=connection.login,
            client_secret=connection.password,
            tenant_id=extras["tenant_id"],
            resource=self.base_url,
            authority_host=authority_host,
            http_client=PinnedSession(self._verify_setting(connection)),
        )

    def close(self) -> None:
        """Close the API session and the token client's session."""
        super().close()
        if self.tokens is not None:
            self.tokens.http_client.close()

    def _auth_headers(self) -> dict[str, str]:
        assert self.tokens is not None
        return {"Authorization": f"Bearer {self.tokens.token()}"}

    def _refresh_credentials(self) -> bool:
        assert self.tokens is not None
        self.tokens.invalidate()
        return True

    def _observe(self, response: requests.Response) -> None:
        hint = response.headers.get("x-ms-dop-hint")
        if hint and hint.isdigit():
            self.dop_hint = int(hint)

    def _error_details(self, response: requests.Response) -> ErrorDetails:
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            return ErrorDetails(
                error.get("code") or None, str(error.get("message") or response.reason), body
            )
        return ErrorDetails(None, response.reason or f"HTTP {response.status_code}", body)

    def _transient(self, status: int, code: str | None) -> bool:
        if code in NON_TRANSIENT_CODES:
            return False
        # A bulk write that ran out of time is sent again smaller by `_bulk`, not replayed as it
        # was; any other request that meets a server timeout is retried like a 5xx.
        in_bulk = getattr(self._writing, "sizer", None) is not None
        return not (in_bulk and (code in SERVER_TIMEOUT_CODES or status == 504))

    def _error_for(self, response: requests.Response, method: str, url: str) -> CrmApiError:
        error = super()._error_for(response, method, url)
        limit = SERVICE_PROTECTION_CODES.get(error.code or "")
        if limit is None:
            return error
        sizer = getattr(self._writing, "sizer", None)
        if sizer is not None:
            sizer.throttled()  # smaller writes from now on, as Microsoft advises after a 429
        return RateLimitError(
            f"service protection limit ({limit}): {error.message}",
            service=error.service,
            method=error.method,
            endpoint=error.endpoint,
            status=error.status,
            code=error.code,
            retry_after=error.retry_after,
            body=error.body,
        )

    def test_connection(self) -> tuple[bool, str]:
        """Check the environment URL and the app's credentials with `WhoAmI`."""
        try:
            self.whoami()
        except Exception as error:
            return False, str(error)
        return True, "Connected to Dataverse"

    def whoami(self) -> dict[str, Any]:
        """`WhoAmI`: the application user's `UserId`, `BusinessUnitId` and `OrganizationId`."""
        return dict(self.request_json("GET", f"{API}/WhoAmI"))

    def rate_limit_headers(self) -> dict[str, str]:
        """The service protection headers of one cheap call (`WhoAmI`), by lower-case name:
        `x-ms-ratelimit-*` (what the user's limits leave) and `x-ms-dop-hint`. Empty when the
        answer carries none."""
        response = self.request("GET", f"{API}/WhoAmI")
        return {
            name.lower(): value
            for name, value in response.headers.items()
            if name.lower().startswith("x-ms-ratelimit-") or name.lower() == "x-ms-dop-hint"
        }

    def user_privileges(self, user_id: str | None = None) -> dict[str, str]:
        """`RetrieveUserPrivileges`: the privileges a user holds through its security roles and
        teams, as privilege name (`prvReadLead`) -> depth (`Basic`, `Local`, `Deep` or `Global`;
        the deepest when several roles grant it). Without `user_id`, the application user's."""
        user = str(uuid.UUID(str(user_id or self.whoami()["UserId"])))
        body = self.request_json("GET", f"{API}/systemusers({user})/{NS}.RetrieveUserPrivileges()")
        held: dict[str, str] = {}
        for privilege in (body or {}).get("RolePrivileges") or []:
            name, depth = privilege.get("PrivilegeName"), privilege.get("Depth")
            if isinstance(depth, int) and 0 <= depth < len(PRIVILEGE_DEPTHS):
                depth = PRIVILEGE_DEPTHS[depth]  # the enum's number, from some serializers
            if not name or depth not in PRIVILEGE_DEPTHS:
                continue
            if name not in held or _deeper(depth, held[name]):
                held[name] = depth
        return held

    # -- metadata ------------------------------------------------------------------------------

    def table(self, entity_set: str) -> TableInfo:
        """The table behind `entity_set` (names, primary key, columns with MaxLength), cached."""
        with self._tables_lock:
            cached = self._tables.get(entity_set)
        if cached is not None:
            return cached
        candidates = self._values(
            f"{API}/EntityDefinitions",
            {
                "$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
                "$filter": f"EntitySetName eq {literal(entity_set)}",
            },
        )
        # $filter compares strings case-insensitively; entity set names in URLs are exact.
        found = [row for row in candidates if row.get("EntitySetName") == entity_set]
        if not found:
            raise NotFoundError(
                f"no table has the entity set '{entity_set}'",
                service=self.service,
                method="GET",
                endpoint=f"{API}/EntityDefinitions",
                status=404,
            )
        definition = f"{API}/EntityDefinitions(LogicalName={literal(found[0]['LogicalName'])})"
        attributes = self._values(
            f"{definition}/Attributes",
            {"$select": "LogicalName,AttributeType,IsValidForCreate,IsValidForUpdate"},
        )
        # MaxLength is a property of the text attribute types, read through their casts.
        max_lengths: dict[str, int] = {}
        for text_type in ("StringAttributeMetadata", "MemoAttributeMetadata"):
            for row in self._values(
                f"{definition}/Attributes/{NS}.{text_type}", {"$select": "LogicalName,MaxLength"}
            ):
                if row.get("MaxLength") is not None:
                    max_lengths[row["LogicalName"]] = int(row["MaxLength"])
        info = TableInfo(
            logical_name=found[0]["LogicalName"],
            entity_set=entity_set,
            primary_id=found[0]["PrimaryIdAttribute"],
            columns={
                row["LogicalName"]: ColumnInfo(
                    name=row["LogicalName"],
                    type=str(row.get("AttributeType") or ""),
                    max_length=max_lengths.get(row["LogicalName"]),
                    valid_for_create=bool(row.get("IsValidForCreate", True)),
                    valid_for_update=bool(row.get("IsValidForUpdate", True)),
                )
                for row in attributes
            },
        )
        with self._tables_lock:
            self._tables[entity_set] = info
        return info

    def _values(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """The `value` array of a one-page collection answer."""
        return (self.request_json("GET", path, params=params) or {}).get("value") or []

    def check_columns(self, entity_set: str, columns: Iterable[str]) -> TableInfo:
        """The table, after checking that every column in `columns` exists in it."""
        info = self.table(entity_set)
        info.check_columns(columns)
        return info

    # -- reads ---------------------------------------------------------------------------------

    def query(
        self,
        entity_set: str,
        *,
        select: Sequence[str] | None = None,
        filter: str | None = None,
        orderby: str | None = None,
        page_size: int = MAX_PAGE_SIZE,
    ) -> Iterator[dict[str, Any]]:
        """Rows of `entity_set`, following `@odata.nextLink` with `Prefer: odata.maxpagesize`.

        Build `filter` with `crm_connectors.odata` (`eq`, `any_of`, `compare`, `all_of`): their
        literals are escaped, so a value can never change the filter's shape. The filter is
        syntax-checked before it is sent.
        """
        params: dict[str, str] = {}
        if select:
            params["$select"] = ",".join(column(name) for name in select)
        if filter:
            params["$filter"] = check_filter(filter)
        if orderby:
            params["$orderby"] = orderby
        for page in self._pages(f"{API}/{entity_set}", params, _max_page(page_size)):
            yield from page.get("value") or []

    def first_row(
        self,
        entity_set: str,
        *,
        select: Sequence[str] | None = None,
        filter: str | None = None,
    ) -> dict[str, Any] | None:
        """The first row matching `filter` (`$top=1`: one request), or None. A filter Dataverse
        refuses raises `ClientError` (400), so this also checks a filter against the table."""
        params: dict[str, str] = {}
        if select:
            params["$select"] = ",".join(column(name) for name in select)
        if filter:
            params["$filter"] = check_filter(filter)
        params["$top"] = "1"
        rows = (self.request_json("GET", f"{API}/{entity_set}", params=params) or {}).get("value")
        return dict(rows[0]) if rows else None

    def find(
        self,
        entity_set: str,
        column_name: str,
        values: Iterable[object],
        *,
        select: Sequence[str] | None = None,
        batch: int = 50,
        filter: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Rows whose `column_name` equals one of `values` (queried `batch` values at a time,
        several queries at once like the bulk writes), and that match `filter` if given."""
        wanted = list(dict.fromkeys(values))
        chunks = [wanted[start : start + batch] for start in range(0, len(wanted), batch)]

        def read(chunk: list[object]) -> list[dict[str, Any]]:
            query = all_of(any_of(column_name, chunk), filter)
            return list(self.query(entity_set, select=select, filter=query))

        for rows in self._parallel(read, chunks):
            yield from rows

    def get_record(
        self, entity_set: str, record_id: str, *, select: Sequence[str] | None = None
    ) -> dict[str, Any] | None:
        """One row by primary key, or None when it does not exist."""
        params = {"$select": ",".join(column(n) for n in select)} if select else None
        try:
            body = self.request_json("GET", _record_path(entity_set, record_id), params=params)
            return dict(body) if body is not None else None
        except ClientError as error:
            if error.status == 404:
                return None
            raise

    def modified_since(
        self,
        entity_set: str,
        since: datetime,
        *,
        select: Sequence[str] | None = None,
        filter: str | None = None,
        page_size: int = MAX_PAGE_SIZE,
        primary_id: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Rows with `modifiedon ge since` (and `filter`), ordered `modifiedon asc, <key> asc`.

        `modifiedon` has whole-second precision: overlap the watermark and de-duplicate by id.
        `primary_id` names the table's key when the caller knows it (else read from metadata).
        """
        primary = primary_id or self.table(entity_set).primary_id
        columns = list(dict.fromkeys([*(select or []), "modifiedon", primary])) if select else None
        yield from self.query(
            entity_set,
            select=columns,
            filter=all_of(compare("modifiedon", "ge", since), filter),
            orderby=f"modifiedon asc,{primary} asc",
            page_size=page_size,
        )

    def changes(
        self,
        entity_set: str,
        *,
        select: Sequence[str],
        delta_link: str | None = None,
        page_size: int = MAX_PAGE_SIZE,
    ) -> Iterator[ChangePage]:
        """Change-tracking pages: with no `delta_link`, every row; with one, what changed since.

        The last page carries the new `delta_link`. Raises `ChangeTrackingExpiredError` when
        the link is too old (read everything again) and `ChangeTrackingNotEnabledError` when the
        table does not track changes.
        """
        prefer = f"odata.track-changes,odata.maxpagesize={_max_page(page_size)}"
        first = delta_link or f"{API}/{entity_set}"
        params = None if delta_link else {"$select": ",".join(column(n) for n in select)}
        try:
            for page in self._pages(first, params, None, prefer=prefer):
                rows, deleted = [], []
                for row in page.get("value") or []:
                    if row.get("reason") == "deleted" or "$deletedEntity" in str(
                        row.get("@odata.context", "")
                    ):
                        deleted.append(str(row.get("id")))
                    else:
                        rows.append(row)
                yield ChangePage(rows, deleted, page.get("@odata.deltaLink"))
        except ClientError as error:
            text = f"{error.code} {error.message}".lower()
            kind: type[ClientError] | None = None
            if any(marker in text for marker in _EXPIRED_DELTA):
                kind = ChangeTrackingExpiredError
            elif any(marker in text for marker in _NO_CHANGE_TRACKING):
                kind = ChangeTrackingNotEnabledError
            if kind is None:
                raise
            raise kind(
                error.message,
                service=error.service,
                method=error.method,
                endpoint=error.endpoint,
                status=error.status,
                code=error.code,
            ) from None

    def _pages(
        self,
        path: str,
        params: dict[str, str] | None,
        page_size: int | None,
        *,
        prefer: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        headers = {"Prefer": prefer or f"odata.maxpagesize={page_size}"}
        paginator = NextLinkPaginator(service=self.service, endpoint=path.split("?", 1)[0])

        def fetch(link: str | None) -> dict[str, Any]:
            if link is None:
                return self.request_json("GET", path, params=params, headers=headers) or {}
            return self.request_json("GET", link, headers=headers) or {}

        yield from iterate_pages(fetch, paginator)

    # -- single-record writes ------------------------------------------------------------------

    def create_record(self, entity_set: str, data: dict[str, Any]) -> str:
        """Create one row; returns its id.

        The id is chosen here (unless `data` has one), so a create whose answer was lost is
        replayed as an upsert of the same id instead of creating a second row.
        """
        primary = self.table(entity_set).primary_id
        record_id = str(data.get(primary) or uuid.uuid4())
        body = {**data, primary: record_id}
        try:
            self.request("POST", f"{API}/{entity_set}", json=body, replay_safe=False)
        except ApiConnectionError:
            self.request("PATCH", _record_path(entity_set, record_id), json=body)
        return record_id

    def update_record(self, entity_set: str, record_id: str, data: dict[str, Any]) -> None:
        """Update one existing row (`If-Match: *`: a missing row is a 404, never a create)."""
        self.request(
            "PATCH", _record_path(entity_set, record_id), json=data, headers={"If-Match": "*"}
        )

    def delete_record(self, entity_set: str, record_id: str) -> bool:
        """`DELETE /<set>(<id>)`; False when the row was already gone (404)."""
        try:
            self.request("DELETE", _record_path(entity_set, record_id))
        except NotFoundError:
            return False
        return True

    def upsert_record(
        self, entity_set: str, key: str | dict[str, object], data: dict[str, Any]
    ) -> str | None:
        """Create or update one row by primary key (a GUID) or alternate key (`{column: value}`).

        Returns the row id when the service reports it (`OData-EntityId`).
        """
        response = self.request("PATCH", _record_path(entity_set, key), json=data)
        return _id_from_entity_url(response.headers.get("OData-EntityId"))

    # -- opportunities -------------------------------------------------------------------------

    def win_opportunity(
        self,
        opportunity_id: str,
        subject: str,
        *,
        actual_revenue: float | None = None,
        close_date: date | datetime | None = None,
        description: str | None = None,
        status: int = 3,
    ) -> None:
        """Close an opportunity as won (`POST /WinOpportunity`; statecode 1, `status` 3 Won).

        The `OpportunityClose` carries `subject` (at most 200 characters), and optionally
        `actualrevenue` (the opportunity's `actualvalue`; without it Dataverse keeps the
        estimated value) and `actualend` (its `actualclosedate`; default today). An opportunity
        that is not open raises `ClientError` (400, `0x80040515`), a missing one
        `NotFoundError`. A close whose answer was lost is checked (`statecode`/`statuscode`)
        before it is sent again. A PATCH of `statecode` cannot win or lose an opportunity;
        reopen one with `update_record(..., {"statecode": 0, "statuscode": 1})`.
        """
        self._close_opportunity(
            "WinOpportunity",
            opportunity_id,
            subject,
            status=status,
            actual_revenue=actual_revenue,
            close_date=close_date,
            description=description,
        )

    def lose_opportunity(
        self,
        opportunity_id: str,
        subject: str,
        *,
        status: int = 4,
        actual_revenue: float | None = None,
        close_date: date | datetime | None = None,
        description: str | None = None,
    ) -> None:
        """Close an opportunity as lost (`POST /LoseOpportunity`; statecode 2, `status` 4
        Canceled or 5 Out-Sold; another status raises `ClientError`, 400 `0x80048408`).
        Otherwise as `win_opportunity`."""
        self._close_opportunity(
            "LoseOpportunity",
            opportunity_id,
            subject,
            status=status,
            actual_revenue=actual_revenue,
            close_date=close_date,
            description=description,
        )

    def _close_opportunity(
        self,
        action: str,
        opportunity_id: str,
        subject: str,
        *,
        status: int,
        actual_revenue: float | None,
        close_date: date | datetime | None,
        description: str | None,
    ) -> None:
        """`WinOpportunity` / `LoseOpportunity` of one opportunity (unbound actions, 204)."""
        state = OPPORTUNITY_CLOSE_STATES[action]
        record_id = str(uuid.UUID(str(opportunity_id)))
        close: dict[str, Any] = {
            "subject": subject,
            "opportunityid@odata.bind": f"/opportunities({record_id})",
        }
        if description is not None:
            close["description"] = description
        if actual_revenue is not None:
            close["actualrevenue"] = actual_revenue
        if close_date is not None:
            close["actualend"] = _close_time(close_date)
        body = {"OpportunityClose": close, "Status": status}
        try:
            self.request("POST", f"{API}/{action}", json=body, replay_safe=False)
        except ApiConnectionError:
            # The close may have committed before the answer was lost: look before resending.
            row = self.get_record("opportunities", record_id, select=["statecode", "statuscode"])
            if (row or {}).get("statecode") == state and (row or {}).get("statuscode") == status:
                return
            self.request("POST", f"{API}/{action}", json=body, replay_safe=False)

    # -- bulk writes ---------------------------------------------------------------------------

    def create_multiple(
        self, entity_set: str, rows: list[dict[str, Any]], *, chunk_size: int = MAX_CHUNK
    ) -> list[WriteResult]:
        """Create rows with `CreateMultiple`, in chunks of at most 1000, several at a time.

        One `WriteResult` per input row, in input order. `CreateMultiple` is all-or-nothing: a
        chunk it rejects is sent again as a `$batch` with `odata.continue-on-error`, one part
        per row, so only the bad rows fail, each with its own error. Ids are chosen here unless
        a row carries one; the fallback writes each row as an upsert of its id, so a chunk whose
        answer was lost can be sent again without creating duplicates.
        """
        info = self.table(entity_set)
        prepared = [
            {**row, info.primary_id: str(row.get(info.primary_id) or uuid.uuid4())} for row in rows
        ]
        return self._bulk("create", info, prepared, chunk_size)

    def update_multiple(
        self, entity_set: str, rows: list[dict[str, Any]], *, chunk_size: int = MAX_CHUNK
    ) -> list[WriteResult]:
        """Update existing rows (each carries its primary key) with `UpdateMultiple`.

        Same chunking, parallelism and per-row fallback as `create_multiple`; the fallback
        sends `If-Match: *`, so a row that does not exist fails instead of being created.
        """
        info = self.table(entity_set)
        return self._bulk("update", info, rows, chunk_size)

    def execute_batch(
        self,
        operations: list[BatchOperation],
        *,
        atomic: bool = False,
        continue_on_error: bool = True,
        replay_safe: bool = False,
    ) -> list[BatchResponse]:
        """Send up to 1000 operations as one `$batch`; one response per operation, in order.

        `atomic` puts them in one change set (all or nothing). Without `continue_on_error` the
        service stops at the first failure and later operations get no response.
        """
        content_type, body = build_batch(operations, atomic=atomic)
        headers = {"Content-Type": content_type}
        if continue_on_error and not atomic:
            headers["Prefer"] = "odata.continue-on-error"
        response = self.request(
            "POST", f"{API}/$batch", data=body, headers=headers, replay_safe=replay_safe
        )
        return parse_batch_response(response.headers.get("Content-Type", ""), response.content)

    def record_url(self, entity_set: str, key: str | dict[str, object]) -> str:
        """The absolute URL of one row, for a `BatchOperation`."""
        self.get_conn()
        return f"{self.base_url}{_record_path(entity_set, key)}"

    def _bulk(
        self, mode: str, info: TableInfo, rows: list[dict[str, Any]], chunk_size: int
    ) -> list[WriteResult]:
        """Write `rows` in chunks the table's `ChunkSizer` sizes (at most `chunk_size`, evened
        out over the workers by `even_share`), up to `min(max_parallel, x-ms-dop-hint)` at a
        time. A chunk without an answer (a client or server timeout) goes back to the queue in
        smaller chunks: for creates, only its rows that do not exist yet (a create that timed
        out may still have committed)."""
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK}")
        started = time.monotonic()
        results: list[WriteResult | None] = [None] * len(rows)
        pending: deque[int] = deque()
        for index, row in enumerate(rows):
            if not row.get(info.primary_id):
                results[index] = WriteResult(
                    index, False, error_code="missing_id", message=f"no {info.primary_id}"
                )
            else:
                pending.append(index)
        sizer = self._sizer(info.entity_set)
        attempts: Counter[int] = Counter()
        requests_sent = 0
        workers = self._workers()
        planned = share = 0  # the chunk size the share was planned for, and the share
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dataverse") as pool:
            running: set[Future[_ChunkOutcome]] = set()
            while pending or running:
                while pending and len(running) < workers:
                    full = min(sizer.size, chunk_size)
                    share, planned = next_share(
                        len(pending),
                        full,
                        workers,
                        measuring=sizer.growing and full == sizer.size,
                        planned=planned,
                        share=share,
                    )
                    size = min(share, len(pending))
                    chunk = [pending.popleft() for _ in range(size)]
                    attempts.update(chunk)
                    for index in [i for i in chunk if attempts[i] > MAX_WRITE_ATTEMPTS]:
                        # Each try went unanswered, down to small chunks: the row fails alone
                        # (a create that may have committed is found by the next run's check).
                        results[index] = WriteResult(
                            index,
                            False,
                            error_code="no_answer",
                            message=f"no answer in time to {MAX_WRITE_ATTEMPTS} {mode} "
                            f"requests, the last of {size} rows",
                        )
                    chunk = [i for i in chunk if attempts[i] <= MAX_WRITE_ATTEMPTS]
                    if not chunk:
                        continue
                    running.add(pool.submit(self._write_chunk, mode, info, rows, chunk, sizer))
                    requests_sent += 1
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    outcome = future.result()
                    for result in outcome.results:
                        results[result.index] = result
                    pending.extendleft(reversed(outcome.again))
                    if outcome.again:
                        planned = 0
        finished = [r for r in results if r is not None]
        log.info(
            "%s_multiple %s: %d rows in %d requests (chunk size now %d), %d ok, %d failed, %.1f s",
            mode,
            info.entity_set,
            len(rows),
            requests_sent,
            sizer.size,
            sum(r.ok for r in finished),
            sum(not r.ok for r in finished),
            time.monotonic() - started,
        )
        return finished

    def _sizer(self, entity_set: str) -> ChunkSizer:
        """The table's chunk sizer: kept for the hook's life, as plug-in costs are per table."""
        with self._tables_lock:
            sizer = self._sizers.get(entity_set)
            if sizer is None:
                target = min(BULK_TARGET_SECONDS, self.timeout / 4)
                sizer = self._sizers[entity_set] = ChunkSizer(
                    start=self.first_chunk, maximum=MAX_CHUNK, target=target
                )
            return sizer

    def _workers(self) -> int:
        """Requests at once: the server's `x-ms-dop-hint` (4 until one arrived), at most
        `max_parallel`."""
        return max(1, min(self.max_parallel, self.dop_hint or DEFAULT_PARALLEL))

    def _parallel(self, work: Callable[[_Chunk], _Result], chunks: list[_Chunk]) -> list[_Result]:
        """Run `work` over the chunks, at most `min(max_parallel, x-ms-dop-hint)` at a time."""
        workers = max(1, min(self._workers(), len(chunks)))
        if workers == 1:
            return [work(chunk) for chunk in chunks]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dataverse") as pool:
            return list(pool.map(work, chunks))

    def _write_chunk(
        self,
        mode: str,
        info: TableInfo,
        rows: list[dict[str, Any]],
        chunk: list[int],
        sizer: ChunkSizer,
    ) -> _ChunkOutcome:
        """One chunk: `CreateMultiple` / `UpdateMultiple`, or row by row in a `$batch` when the
        table does not support them or the action rejected the chunk."""
        started = time.monotonic()
        upsert = mode == "create"
        self._writing.sizer = sizer
        try:
            if info.entity_set in self._no_bulk_actions:
                outcome = _ChunkOutcome(self._fallback(info, rows, chunk, None, upsert=upsert))
            else:
                outcome = _ChunkOutcome(self._bulk_chunk(mode, info, rows, chunk))
        except ServerError as error:
            if _timed_out(error):
                return self._timed_out_chunk(info, rows, chunk, sizer, mode, error.code)
            if error.retryable or info.entity_set in self._no_bulk_actions:
                raise  # the server kept failing after the retries: a run-level problem
            # A decision, not an outage (e.g. duplicate detection): row by row, so only the
            # rows it concerns fail.
            return _ChunkOutcome(self._fallback(info, rows, chunk, error, upsert=upsert))
        except ApiConnectionError:
            return self._timed_out_chunk(info, rows, chunk, sizer, mode, "no answer")
        finally:
            self._writing.sizer = None
        sizer.answered(len(chunk), time.monotonic() - started)
        return outcome

    def _timed_out_chunk(
        self,
        info: TableInfo,
        rows: list[dict[str, Any]],
        chunk: list[int],
        sizer: ChunkSizer,
        mode: str,
        what: str | None,
    ) -> _ChunkOutcome:
        """A chunk that got no answer in time: smaller chunks from now on, and its rows sent
        again (for creates, only those that do not exist)."""
        self._writing.sizer = None  # the existence check is a read, retried as reads are
        sizer.timed_out(len(chunk))
        log.info(
            "%s: %s of %d rows got no answer in time (%s); next chunks of %d",
            info.entity_set,
            mode,
            len(chunk),
            what,
            sizer.size,
        )
        if mode != "create":
            return _ChunkOutcome([], chunk)  # updates are idempotent: all of it again
        # Of creates, the rows that exist committed (their ids were chosen here): done.
        ids = [(str(rows[i][info.primary_id]).lower(), i) for i in chunk]
        found = self.find(
            info.entity_set,
            info.primary_id,
            [uuid.UUID(record_id) for record_id, _ in ids],
            select=[info.primary_id],
        )
        exist = {str(row[info.primary_id]).lower() for row in found}
        done = [WriteResult(i, True, id=record_id) for record_id, i in ids if record_id in exist]
        return _ChunkOutcome(done, [i for record_id, i in ids if record_id not in exist])

    def _bulk_chunk(
        self, mode: str, info: TableInfo, rows: list[dict[str, Any]], chunk: list[int]
    ) -> list[WriteResult]:
        """One `CreateMultiple` / `UpdateMultiple` call. Not replayed by the request's retries:
        a timeout shrinks the chunk instead (`_write_chunk`)."""
        targets = [{"@odata.type": f"{NS}.{info.logical_name}", **rows[i]} for i in chunk]
        action = "CreateMultiple" if mode == "create" else "UpdateMultiple"
        try:
            body = self.request_json(
                "POST",
                f"{API}/{info.entity_set}/{NS}.{action}",
                json={"Targets": targets},
                replay_safe=False,
            )
        except ClientError as error:
            return self._rejected(info, rows, chunk, error, upsert=mode == "create")
        ids = [str(rows[i][info.primary_id]) for i in chunk]
        returned = [str(i) for i in (body or {}).get("Ids") or []]
        if len(returned) == len(chunk):
            ids = returned  # what CreateMultiple answers: the ids, in input order
        return [WriteResult(i, True, id=record_id) for i, record_id in zip(chunk, ids, strict=True)]

    def _rejected(
        self,
        info: TableInfo,
        rows: list[dict[str, Any]],
        chunk: list[int],
        error: ClientError,
        *,
        upsert: bool,
    ) -> list[WriteResult]:
        """A bulk action refused the chunk: remember a table that does not support the bulk
        actions, then write the chunk row by row, so only bad rows fail."""
        if _bulk_unsupported(error):
            with self._tables_lock:
                if info.entity_set not in self._no_bulk_actions:
                    log.warning(
                        "%s does not support CreateMultiple/UpdateMultiple (%s); writing it "
                        "row by row in $batch from now on",
                        info.entity_set,
                        f"HTTP {error.status} {error.code or ''}".strip(),
                    )
                self._no_bulk_actions.add(info.entity_set)
        return self._fallback(info, rows, chunk, error, upsert=upsert)

    def _fallback(
        self,
        info: TableInfo,
        rows: list[dict[str, Any]],
        chunk: list[int],
        cause: CrmApiError | None,
        *,
        upsert: bool,
    ) -> list[WriteResult]:
        """Write a chunk row by row in `$batch` parts (creates as upserts of their chosen ids,
        updates with `If-Match: *`), so only bad rows fail and a replay writes nothing twice."""
        if cause is not None:
            log.info(
                "%s: chunk of %d rows rejected (%s); writing it row by row in $batch",
                info.entity_set,
                len(chunk),
                f"HTTP {cause.status} {cause.code or ''}".strip(),
            )
        headers = {} if upsert else {"If-Match": "*"}
        operations = []
        for i in chunk:
            record_id = str(rows[i][info.primary_id])
            body = {k: v for k, v in rows[i].items() if k != info.primary_id}
            operations.append(
                BatchOperation("PATCH", self.record_url(info.entity_set, record_id), body, headers)
            )
        responses: list[BatchResponse] = []
        for start in range(0, len(operations), MAX_BATCH_PARTS):
            # Each part is idempotent, but a timeout must reach the sizer, not be replayed.
            responses += self.execute_batch(
                operations[start : start + MAX_BATCH_PARTS], replay_safe=False
            )
        results = []
        for position, i in enumerate(chunk):
            record_id = str(rows[i][info.primary_id])
            part = responses[position] if position < len(responses) else None
            results.append(_row_result(i, record_id, part))
        return results


@dataclass(frozen=True)
class _ChunkOutcome:
    """One chunk's results, and the rows to send again (in smaller chunks)."""

    results: list[WriteResult]
    again: list[int] = field(default_factory=list)


def _timed_out(error: ServerError) -> bool:
    """A server answer saying the request ran out of time (a bulk action's writes are rolled
    back; a `$batch`'s finished parts stay, which re-sending finds or rewrites)."""
    return error.code in SERVER_TIMEOUT_CODES or error.status == 504


def _bulk_unsupported(error: ClientError) -> bool:
    """The table does not support `CreateMultiple` / `UpdateMultiple`."""
    message = error.message or ""
    return error.code in BULK_UNSUPPORTED_CODES or (
        "Multiple' method does not support entities" in message
    )


def _row_result(index: int, record_id: str, part: BatchResponse | None) -> WriteResult:
    if part is None:
        return WriteResult(index, False, error_code="not_attempted", message="no batch response")
    if part.ok:
        return WriteResult(index, True, id=record_id, status=part.status)
    error = part.body.get("error") if isinstance(part.body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else str(part.body or "")
    return WriteResult(
        index,
        False,
        error_code=code or f"http_{part.status}",
        message=mask_emails(str(message)),
        status=part.status,
    )


def _deeper(depth: str, than: str) -> bool:
    return PRIVILEGE_DEPTHS.index(depth) > PRIVILEGE_DEPTHS.index(than)


# The statecode each action closes an opportunity into: 1 Won, 2 Lost.
OPPORTUNITY_CLOSE_STATES = {"WinOpportunity": 1, "LoseOpportunity": 2}
# The tables a customer lookup (`parentcustomerid` of contacts, `customerid` of opportunities)
# can point at, by logical name, and their entity sets.
CUSTOMER_TABLES = {"account": "accounts", "contact": "contacts"}


def customer_bind(lookup: str, table: str, record_id: str | None) -> dict[str, str | None]:
    """The body entry that sets a customer lookup to a row of `table` (`account` or `contact`):
    `customer_bind("parentcustomerid", "account", id)` is
    `{"parentcustomerid_account@odata.bind": "/accounts(<id>)"}`. A customer lookup is written
    through one navigation property per table (`<lookup>_<table>`; the lookup's own name is
    refused, 400 `0x80048d19`) and read back as `_<lookup>_value`. `record_id` None clears it
    (`null`, in a PATCH)."""
    entity_set = CUSTOMER_TABLES.get(table)
    if entity_set is None:
        raise ValueError(f"a customer lookup points at an account or a contact, not {table!r}")
    navigation = f"{column(lookup)}_{table}@odata.bind"
    if record_id is None:
        return {navigation: None}
    return {navigation: f"/{entity_set}({uuid.UUID(str(record_id))})"}


def _close_time(moment: date | datetime) -> str:
    """An `OpportunityClose.actualend` (Edm.DateTimeOffset, shown as a date in the user's zone):
    a datetime as given (naive = UTC); a date at 12:00 UTC, which is that same date in every
    zone from UTC-11 to UTC+11."""
    if isinstance(moment, datetime):
        aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return aware.isoformat(timespec="seconds")
    return f"{moment.isoformat()}T12:00:00Z"


def _record_path(entity_set: str, key: str | dict[str, object]) -> str:
    if isinstance(key, dict):
        inner = ",".join(f"{column(name)}={literal(value)}" for name, value in key.items())
    else:
        inner = str(uuid.UUID(str(key)))
    return f"{API}/{entity_set}({inner})"


def _id_from_entity_url(url: str | None) -> str | None:
    match = _ENTITY_ID.search(url or "")
    return match.group(1) if match else None


def _max_page(page_size: int) -> int:
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    return page_size
