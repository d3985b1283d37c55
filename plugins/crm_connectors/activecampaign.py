"""Airflow hook for the ActiveCampaign API v3: paced, retried, paged, with the bulk import path."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import requests

from crm_connectors.base import CrmHttpHook, ErrorDetails
from crm_connectors.errors import (
    ApiConnectionError,
    BulkImportError,
    ClientError,
    ConnectionSettingsError,
    NotFoundError,
    TieOrderError,
)
from crm_connectors.pacing import WindowBudget, shared_budget, shared_window
from crm_connectors.paging import KeysetPaginator, OffsetPaginator, Paginator, iterate_pages
from crm_connectors.redact import mask_emails
from crm_connectors.retry import RetryPolicy

log = logging.getLogger(__name__)

API = "/api/3"
MAX_PAGE = 100
MAX_IMPORT_CHUNK = 250
IMPORTS_PER_MINUTE = 100
# The earliest UTC offset in use: a wall-clock time written at it is never later than the same
# instant's wall-clock time in any account's zone.
EARLIEST_OFFSET = timedelta(hours=-12)
# How far an account's offset may have moved (daylight saving time) since AC rendered the
# timestamp it was learned from.
DST_SHIFT = timedelta(hours=1)


@dataclass(frozen=True)
class ImportResult:
    """The outcome of one input row of `bulk_import` (`index` is its position in the input)."""

    index: int
    email: str
    ok: bool
    contact_id: str | None = None
    error: str | None = None
    #: Not imported, and not known to be bad: AC's `failureReasons` named its position or the
    #: one next to it (the index base is undocumented). Write it alone to learn which it was.
    suspect: bool = False


class ActiveCampaignHook(CrmHttpHook):
    """ActiveCampaign API v3 over one reused session.

    Connection (conn type `http`): `host` = the account's full API URL (e.g.
    `https://ACCOUNT.api-us1.com`; a trailing `/api/3` is accepted), `password` = the API token
    (sent as the `Api-Token` header). Optional extras: `ca_bundle`, a CA file to trust;
    `rate_limit`, the account's requests per second when it is not AC's published 5.

    Every request takes a slot of a rate budget shared by all hooks of the process on the same
    account (`rate_limit` requests per second, default 5, AC's published limit). 429 and 503 wait
    `Retry-After` (the whole budget pauses); 5xx and connection errors back off with jitter; the
    number of attempts is bounded by `retry_policy`. Other 4xx raise at once.

    :param activecampaign_conn_id: the Airflow connection id.
    :param rate_limit: requests per second for the whole account (None: unpaced).
    :param retry_policy: attempts and backoff (see `RetryPolicy`).
    :param timeout: seconds to wait for one response.
    :param import_poll_interval: seconds between a bulk import batch's submission (or last
        `import/info` poll) and its next poll.
    :param import_timeout: seconds one bulk import batch may take before `BulkImportError`.
    :param max_in_flight: bulk import batches sent and not yet applied, at most (when AC lags,
        the next chunk waits: what the import holds stays bounded).
    """

    conn_name_attr = "activecampaign_conn_id"
    default_conn_name = "activecampaign_default"
    conn_type = "http"
    hook_name = "ActiveCampaign"
    service = "activecampaign"

    def __init__(
        self,
        activecampaign_conn_id: str = default_conn_name,
        *,
        rate_limit: float | None = 5.0,
        retry_policy: RetryPolicy | None = None,
        timeout: float = 60.0,
        import_poll_interval: float = 1.0,
        import_timeout: float = 900.0,
        max_in_flight: int = 200,
    ) -> None:
        super().__init__(activecampaign_conn_id, retry_policy=retry_policy, timeout=timeout)
        self.activecampaign_conn_id = activecampaign_conn_id
        self.rate_limit = rate_limit
        self.import_poll_interval = import_poll_interval
        self.import_timeout = import_timeout
        self.max_in_flight = max_in_flight
        self.import_budget = WindowBudget(IMPORTS_PER_MINUTE, 60.0)
        self._tag_ids: dict[str, str] = {}
        #: The account's UTC offset, learned from the first AC timestamp read (None: not yet).
        self.account_offset: timedelta | None = None

    def _configure(self, session: requests.Session, connection: Any) -> None:
        if not connection.password:
            raise ConnectionSettingsError(
                f"connection '{self.activecampaign_conn_id}' has no password: set it to the "
                "account's API token (Settings > Developer in ActiveCampaign)"
            )
        self.base_url = self.base_url.rstrip("/").removesuffix(API)
        session.headers.update({"Api-Token": connection.password, "Accept": "application/json"})
        # Extra `rate_limit`: the account's requests per second, when it differs from AC's 5.
        rate = connection.extra_dejson.get("rate_limit", self.rate_limit)
        self.budget = shared_budget(self.base_url, float(rate) if rate else None)
        self.import_budget = shared_window(f"{self.base_url}#import", IMPORTS_PER_MINUTE, 60.0)

    def _error_details(self, response: requests.Response) -> ErrorDetails:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            errors = body.get("errors")
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                first = errors[0]
                text = " - ".join(str(first[k]) for k in ("title", "detail") if first.get(k))
                return ErrorDetails(first.get("code"), text or response.reason, body)
            if body.get("message"):
                return ErrorDetails(None, str(body["message"]), body)
        return ErrorDetails(None, response.reason or f"HTTP {response.status_code}", body)

    def test_connection(self) -> tuple[bool, str]:
        """Check the URL and the token with `GET /api/3/users/me`."""
        try:
            self.current_user()
        except Exception as error:
            return False, str(error)
        return True, "Connected to ActiveCampaign"

    def current_user(self) -> dict[str, Any]:
        """The user the API token belongs to (`GET /users/me`)."""
        body = self.request_json("GET", f"{API}/users/me") or {}
        return dict(body.get("user") or {})

    def rate_limit_headers(self) -> dict[str, str]:
        """The `RateLimit-*` headers of one cheap call (`GET /users/me`), by lower-case name:
        what the account's limit leaves. Empty when the answer carries none."""
        response = self.request("GET", f"{API}/users/me")
        return {
            name.lower(): value
            for name, value in response.headers.items()
            if name.lower().startswith("ratelimit-")
        }

    # -- paging --------------------------------------------------------------------------------

    def iter_items(
        self,
        path: str,
        items_key: str,
        *,
        params: dict[str, Any] | list[tuple[str, Any]] | None = None,
        keyset: bool = False,
        page_size: int = MAX_PAGE,
    ) -> Iterator[dict[str, Any]]:
        """Every item of a list endpoint, page by page (offset paging, or id keyset paging)."""
        endpoint = f"{API}/{path.lstrip('/')}"
        options = dict(service=self.service, endpoint=endpoint)
        paginator: Paginator = (
            KeysetPaginator(items_key, limit=page_size, **options)
            if keyset
            else OffsetPaginator(items_key, limit=page_size, **options)
        )
        base = list(params.items()) if isinstance(params, dict) else list(params or [])

        def fetch(token: Any | None) -> dict[str, Any]:
            query = base + list(paginator.params(token).items())
            return self.request_json("GET", endpoint, params=query) or {}

        for page in iterate_pages(fetch, paginator):
            yield from page.get(items_key) or []

    # -- contacts ------------------------------------------------------------------------------

    def list_contacts(
        self,
        *,
        tag_id: str | int | None = None,
        updated_after: datetime | None = None,
        ids: Iterable[str | int] | None = None,
        email: str | None = None,
        page_size: int = MAX_PAGE,
    ) -> Iterator[dict[str, Any]]:
        """Contacts matching every filter given, in id order (keyset paging).

        `updated_after` returns exactly the contacts whose `udate` is at or after it (to the
        second): AC is sent a bound early enough under every reading of the filter
        (`updated_after_bound`) and what it returns in excess is dropped here.
        """
        params: list[tuple[str, Any]] = []
        if tag_id is not None:
            params.append(("tagid", str(tag_id)))
        if updated_after is not None:
            bound = updated_after_bound(updated_after, self.account_offset)
            params.append(("filters[updated_after]", bound))
        if email is not None:
            params.append(("email", email))
        if ids is None:
            found = self.iter_items(
                "contacts", "contacts", params=params, keyset=True, page_size=page_size
            )
            floor = _utc(updated_after).replace(microsecond=0) if updated_after else None
            for contact in found:
                self._note_offset(contact.get("cdate"))
                # A `udate` that cannot be read is kept: reading a contact twice costs less
                # than missing its update.
                updated = _parse_time(contact.get("udate"))
                if floor is None or updated == datetime.min.replace(tzinfo=UTC) or updated >= floor:
                    yield contact
            return
        wanted = [str(i) for i in ids]
        for start in range(0, len(wanted), MAX_PAGE):
            chunk = wanted[start : start + MAX_PAGE]
            # One page of 100 holds every match of at most 100 ids: no request for a next page.
            query = [*params, *(("ids[]", i) for i in chunk), ("limit", MAX_PAGE)]
            body = self.request_json("GET", f"{API}/contacts", params=query) or {}
            yield from body.get("contacts") or []

    def _note_offset(self, value: Any) -> None:
        """Learn the account's UTC offset from an AC timestamp (ISO 8601 with the offset)."""
        if self.account_offset is None and value:
            with contextlib.suppress(ValueError):
                self.account_offset = datetime.fromisoformat(str(value)).utcoffset()

    def get_contact(self, contact_id: str | int) -> dict[str, Any] | None:
        """One contact (the `contact` object of the side-loaded envelope), None if missing."""
        try:
            body = self.request_json("GET", f"{API}/contacts/{contact_id}")
        except NotFoundError:
            return None
        contact = body.get("contact")
        return dict(contact) if contact is not None else None

    def contacts_after(self, after_id: int, *, limit: int = MAX_PAGE) -> list[dict[str, Any]]:
        """One page of contacts in id order with ids above `after_id` (`orders[id]=ASC`,
        `id_greater`): a scan of every contact, a page per call."""
        params = {"orders[id]": "ASC", "id_greater": str(after_id), "limit": str(limit)}
        body = self.request_json("GET", f"{API}/contacts", params=params) or {}
        return list(body.get("contacts") or [])

    def delete_contact(self, contact_id: str | int) -> bool:
        """`DELETE /contacts/{id}`; False when the contact was already gone (404)."""
        try:
            self.request("DELETE", f"{API}/contacts/{contact_id}")
        except NotFoundError:
            return False
        return True

    def find_contact_by_email(self, email: str) -> dict[str, Any] | None:
        """The contact with this email (AC allows one per email), or None."""
        return next(iter(self.list_contacts(email=email)), None)

    def count_contacts(self) -> int:
        """How many contacts the account holds (`meta.total` of a one-contact page)."""
        body = self.request_json("GET", f"{API}/contacts", params={"limit": 1}) or {}
        return int((body.get("meta") or {}).get("total") or 0)

    def update_contact(self, contact_id: str | int, fields: dict[str, Any]) -> dict[str, Any]:
        """`PUT /contacts/{id}`: change the given fields of one contact (its email too, which
        `sync_contact` cannot); returns the contact."""
        body = self.request_json("PUT", f"{API}/contacts/{contact_id}", json={"contact": fields})
        return dict((body or {}).get("contact") or {})

    def sync_contact(self, contact: dict[str, Any]) -> dict[str, Any]:
        """`POST /contact/sync`: create or update by email; returns the contact."""
        body = self.request_json(
            "POST", f"{API}/contact/sync", json={"contact": contact}, replay_safe=True
        )
        return dict(body["contact"])

    # -- tags ----------------------------------------------------------------------------------

    def contact_tags(self, contact_id: str | int) -> list[dict[str, Any]]:
        """Every tag association of one contact (`contactTags` rows: `id`, `tag`, `contact`...)."""
        body = self.request_json("GET", f"{API}/contacts/{contact_id}/contactTags")
        return body.get("contactTags") or []

    def contact_tags_by_tag(
        self, tag_id: str | int, *, since: datetime | None = None
    ) -> Iterator[dict[str, Any]]:
        """Associations of one tag dated at or after `since` (all without), each exactly once,
        newest second first.

        Pages `orders[cdate]=DESC` by offset, 100 at a time. AC sorts with no tiebreak, so the
        associations of one second (a bulk import, an automation run) may come in a new order
        on every page: where a second runs on past a page's end, offset paging can skip some of
        its rows and repeat others. Such a second is read whole with `filters[cdate]=<that
        second>` (AC matches one exact timestamp) unless the rows already read account for all
        of it (their number equals the room the second takes between its neighbours), and
        paging resumes after it. A page that holds a single second starts that read at once.
        Exact by construction for a second of up to 100 associations (one page, so no order is
        involved); a larger one is paged in AC's default order and checked against its
        `meta.total`, raising `TieOrderError` rather than returning a partial set.
        """
        tag = str(tag_id)
        floor = _utc(since) if since is not None else None
        order = [("filters[tagid]", tag), ("orders[cdate]", "DESC")]
        seen: set[str] = set()
        offset = 0
        tail: _Second | None = None  # the previous page's last second, which may run on
        while True:
            rows, total = self._contact_tag_page(order, offset)
            if not rows:
                return
            moments = [_parse_time(row.get("cdate")) for row in rows]
            self._note_offset(rows[0].get("cdate"))
            last_page = len(rows) < MAX_PAGE or (total is not None and offset + len(rows) >= total)
            if tail is not None and moments[0] == tail.moment:
                # The previous page's last second runs on here, shuffled across both pages.
                ends = next((i for i, m in enumerate(moments) if m != tail.moment), len(rows))
                tail.ids.update(str(row["id"]) for row in rows[:ends])
                if ends == len(rows) and not last_page:
                    # ... and fills this page too: read it whole and page on after it.
                    offset = tail.start + (yield from self._tag_second(tag, tail, seen))
                    tail = None
                    if total is not None and offset >= total:
                        return
                    continue
                if len(tail.ids) != offset + ends - tail.start:
                    yield from self._tag_second(tag, tail, seen)  # some rows were repeated
            for row, moment in zip(rows, moments, strict=True):
                if floor is not None and moment < floor:
                    return  # everything newer was on this page or above
                if str(row["id"]) not in seen:
                    seen.add(str(row["id"]))
                    yield row
            if last_page:
                return
            newer = sum(m > moments[-1] for m in moments)
            tail = _Second(
                moment=moments[-1],
                stamp=str(rows[-1].get("cdate")),
                start=offset + newer,
                ids={str(r["id"]) for r, m in zip(rows, moments, strict=True) if m == moments[-1]},
            )
            if newer == 0:
                # A page of one second, which began at its top: read that second whole now.
                offset = tail.start + (yield from self._tag_second(tag, tail, seen))
                tail = None
                if total is not None and offset >= total:
                    return
                continue
            offset += len(rows)

    def _contact_tag_page(
        self, params: list[tuple[str, Any]], offset: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        """One page of `GET /contactTags` (100 rows from `offset`) and its `meta.total`."""
        query = [*params, ("limit", MAX_PAGE), ("offset", offset)]
        body = self.request_json("GET", f"{API}/contactTags", params=query) or {}
        return body.get("contactTags") or [], _as_int((body.get("meta") or {}).get("total"))

    def _tag_second(
        self, tag: str, second: _Second, seen: set[str]
    ) -> Generator[dict[str, Any], None, int]:
        """Every association of `tag` dated `second`, read with `filters[cdate]` (AC's default
        order, no sort column): yields those not in `seen`, returns how many there are.

        Exact when one answer holds them all. Over several pages, exact when the distinct rows
        number `meta.total` (the same on every page); otherwise, or when the answer misses a row
        of that second already read or holds another second's, `TieOrderError`.
        """
        params = [("filters[tagid]", tag), ("filters[cdate]", second.stamp)]
        ids: set[str] = set()
        totals: set[int | None] = set()
        offset = 0
        while True:
            rows, total = self._contact_tag_page(params, offset)
            totals.add(total)
            if any(_parse_time(row.get("cdate")) != second.moment for row in rows):
                raise self._tie_error(f"filters[cdate]={second.stamp} answered other seconds")
            for row in rows:
                ids.add(str(row["id"]))
                if str(row["id"]) not in seen:
                    seen.add(str(row["id"]))
                    yield row
            offset += len(rows)
            if len(rows) < MAX_PAGE or total is None or offset >= total:
                break
        whole = offset == len(ids) < MAX_PAGE or (len(totals) == 1 and len(ids) == total)
        if not whole or not second.ids <= ids:
            raise self._tie_error(
                f"the {total} associations dated {second.stamp} came as {len(ids)} distinct"
                f" rows in {offset}: their order changed between pages, or rows went missing"
            )
        return len(ids)

    def _tie_error(self, message: str) -> TieOrderError:
        return TieOrderError(
            message, service=self.service, method="GET", endpoint=f"{API}/contactTags"
        )

    def list_tags(self, *, starts_with: str | None = None) -> Iterator[dict[str, Any]]:
        """Every tag, or those whose name starts with `starts_with`
        (`filters[search][starts_with]`)."""
        params = {"filters[search][starts_with]": starts_with} if starts_with is not None else None
        return self.iter_items("tags", "tags", params=params)

    def find_tag(self, name: str) -> dict[str, Any] | None:
        """The contact tag named `name` in any case (AC tag names are unique regardless of
        case: `d365: lead` is the tag `D365: Lead`), or None. The exact spelling wins."""
        params = {"filters[search][eq]": name}
        found = [
            tag
            for tag in self.iter_items("tags", "tags", params=params)
            if str(tag.get("tag", "")).lower() == name.lower()
            and tag.get("tagType", "contact") == "contact"
        ]
        return next((t for t in found if t.get("tag") == name), found[0] if found else None)

    def create_tag(self, name: str, description: str = "") -> dict[str, Any]:
        """Create a contact tag; returns it."""
        body = {"tag": {"tag": name, "tagType": "contact", "description": description}}
        return dict(self.request_json("POST", f"{API}/tags", json=body)["tag"])

    def find_or_create_tags(self, names: Iterable[str]) -> dict[str, str]:
        """Tag ids by name, creating the tags that do not exist yet (cached per hook). Names
        match in any case, as AC's uniqueness rule does: an account's `d365: lead` is used for
        `D365: Lead`, never duplicated (the exact spelling wins when both exist).

        Several names with a common prefix (such as the four `D365: ` tags) are looked up in one
        request (`filters[search][starts_with]`) instead of one each.
        """
        wanted = list(names)
        unknown = [name for name in dict.fromkeys(wanted) if name not in self._tag_ids]
        prefix = _common_prefix(unknown) if len(unknown) > 1 else ""
        if len(prefix.strip()) >= 3:
            by_lower = {name.lower(): name for name in unknown}
            for tag in self.list_tags(starts_with=prefix):
                self._note_offset(tag.get("cdate"))
                name = by_lower.get(str(tag.get("tag", "")).lower())
                if name is None or tag.get("tagType", "contact") != "contact":
                    continue
                if tag.get("tag") == name or name not in self._tag_ids:
                    self._tag_ids[name] = str(tag["id"])
            for name in unknown:
                if name not in self._tag_ids:
                    self._tag_ids[name] = str(self._create_missing_tag(name)["id"])
        for name in wanted:
            if name not in self._tag_ids:
                tag = self.find_tag(name) or self._create_missing_tag(name)
                self._tag_ids[name] = str(tag["id"])
        return {name: self._tag_ids[name] for name in wanted}

    def _create_missing_tag(self, name: str) -> dict[str, Any]:
        try:
            return self.create_tag(name)
        except ApiConnectionError:
            # The create may have landed before the connection dropped: look before resending.
            return self.find_tag(name) or self.create_tag(name)
        except ClientError as error:
            # 422: someone created the same name in between.
            found = self.find_tag(name) if error.status == 422 else None
            if found is None:
                raise
            return found

    def add_contact_tag(self, contact_id: str | int, tag_id: str | int) -> str:
        """Tag a contact; returns the association id (the existing one if already tagged)."""
        body = {"contactTag": {"contact": str(contact_id), "tag": str(tag_id)}}
        try:
            created = self.request_json("POST", f"{API}/contactTags", json=body)
        except (ApiConnectionError, ClientError) as error:
            if isinstance(error, ClientError) and error.status != 422:
                raise
            existing = self._association(contact_id, tag_id)
            if existing is not None:
                return existing
            if isinstance(error, ClientError):
                raise
            created = self.request_json("POST", f"{API}/contactTags", json=body)
        return str(created["contactTag"]["id"])

    def remove_contact_tag(self, association_id: str | int) -> bool:
        """Delete one association (its id, not the tag id); False if it was already gone."""
        try:
            self.request("DELETE", f"{API}/contactTags/{association_id}")
        except NotFoundError:
            return False
        return True

    def remove_tag_from_contact(self, contact_id: str | int, tag_id: str | int) -> bool:
        """Untag a contact by tag id; False if it did not carry the tag."""
        association = self._association(contact_id, tag_id)
        return association is not None and self.remove_contact_tag(association)

    def _association(self, contact_id: str | int, tag_id: str | int) -> str | None:
        for row in self.contact_tags(contact_id):
            if str(row.get("tag")) == str(tag_id):
                return str(row["id"])
        return None

    # -- custom fields -------------------------------------------------------------------------

    def list_fields(self) -> list[dict[str, Any]]:
        """Every custom contact field (`id`, `title`, `type`, `perstag`...)."""
        return list(self.iter_items("fields", "fields"))

    def create_field(self, title: str, perstag: str, *, field_type: str = "text") -> dict[str, Any]:
        """Create a custom contact field with this personalization tag, shown on every list
        (`POST /fields`, then `POST /fieldRels` with `relid` 0); returns the field."""
        body = {"field": {"title": title, "type": field_type, "perstag": perstag, "visible": 1}}
        field = self.request_json("POST", f"{API}/fields", json=body)["field"]
        relation = {"fieldRel": {"field": str(field["id"]), "relid": 0}}
        self.request("POST", f"{API}/fieldRels", json=relation)
        return dict(field)

    def contact_field_values(self, contact_id: str | int) -> list[dict[str, Any]]:
        """One contact's custom field values (`field`, `value`, `id`...)."""
        body = self.request_json("GET", f"{API}/contacts/{contact_id}/fieldValues")
        return body.get("fieldValues") or []

    def list_field_values(self, field_id: str | int) -> Iterator[dict[str, Any]]:
        """Every value of one custom field, across contacts (`contact`, `value`...), 100 per
        request (`GET /fieldValues?filters[fieldid]=`)."""
        return self.iter_items("fieldValues", "fieldValues", params={"filters[fieldid]": field_id})

    def count_field_values(self, field_id: str | int) -> int:
        """How many values one custom field holds, across contacts (`meta.total`, one request)."""
        params = {"filters[fieldid]": field_id, "limit": 1}
        body = self.request_json("GET", f"{API}/fieldValues", params=params) or {}
        return int((body.get("meta") or {}).get("total") or 0)

    def set_field_value(self, contact_id: str | int, field_id: str | int, value: str) -> None:
        """Set one custom field of a contact (`POST /fieldValues`)."""
        body = {"fieldValue": {"contact": str(contact_id), "field": str(field_id), "value": value}}
        self.request("POST", f"{API}/fieldValues", json=body, replay_safe=True)

    # -- accounts ------------------------------------------------------------------------------

    def list_accounts(
        self, *, search: str | None = None, count_deals: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Every account, or those whose name contains `search`, 100 per request
        (`GET /accounts`, offset paging). `count_deals` asks AC to fill `contactCount` and
        `dealCount` (without it both read "0"). AC documents no other filter nor any order."""
        params: dict[str, Any] = {}
        if search is not None:
            params["search"] = search
        if count_deals:
            params["count_deals"] = "true"
        for account in self.iter_items("accounts", "accounts", params=params):
            yield _string_ids(account, _ACCOUNT_IDS)

    def find_account(self, name: str) -> dict[str, Any] | None:
        """The account named `name` in any case, or None: `search` (contains), then the names
        compared here. AC names are unique (reference §2.12), and compared without case as
        MySQL's default collation does (UNCONFIRMED); the exact spelling wins."""
        wanted = name.strip()
        found = [
            account
            for account in self.list_accounts(search=wanted)
            if str(account.get("name", "")).strip().lower() == wanted.lower()
        ]
        return next((a for a in found if a.get("name") == wanted), found[0] if found else None)

    def get_account(self, account_id: str | int) -> dict[str, Any] | None:
        """One account (`GET /accounts/{id}`), None if it does not exist."""
        try:
            body = self.request_json("GET", f"{API}/accounts/{account_id}")
        except NotFoundError:
            return None
        account = (body or {}).get("account")
        return _string_ids(account, _ACCOUNT_IDS) if account is not None else None

    def create_account(
        self,
        name: str,
        *,
        account_url: str | None = None,
        owner: str | int | None = None,
        fields: Iterable[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """`POST /accounts`; returns the account (with its `fields`).

        `fields` are custom values in AC's shape, `[{"customFieldId": "3", "fieldValue": "x"}]`
        (`fieldCurrency` too for a currency field). A name already taken, in any case, raises
        `ClientError` (422, code `duplicate`); no name, 422 `field_missing`. A create whose
        answer was lost is looked up by name before it is sent again (names are unique).
        """
        account: dict[str, Any] = {"name": name}
        if account_url is not None:
            account["accountUrl"] = account_url
        if owner is not None:
            account["owner"] = str(owner)
        if fields is not None:
            account["fields"] = list(fields)
        try:
            body = self.request_json("POST", f"{API}/accounts", json={"account": account})
        except ApiConnectionError:
            found = self.find_account(name)
            if found is not None:
                return found
            body = self.request_json("POST", f"{API}/accounts", json={"account": account})
        return _string_ids(body["account"], _ACCOUNT_IDS)

    def update_account(self, account_id: str | int, **attributes: Any) -> dict[str, Any]:
        """`PUT /accounts/{id}` with AC's attribute names (`name`, `accountUrl`, `owner`,
        `fields`: custom values are upserted); returns the account. A name another account
        has raises `ClientError` (422 `duplicate`), a missing account `NotFoundError`."""
        body = self.request_json(
            "PUT", f"{API}/accounts/{account_id}", json={"account": attributes}
        )
        return _string_ids(body["account"], _ACCOUNT_IDS)

    def delete_account(self, account_id: str | int) -> bool:
        """`DELETE /accounts/{id}` (its contact associations and custom values go with it);
        False when it was already gone (404)."""
        try:
            self.request("DELETE", f"{API}/accounts/{account_id}")
        except NotFoundError:
            return False
        return True

    def list_account_contacts(
        self,
        *,
        contact_id: str | int | None = None,
        account_id: str | int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Contact-account associations (`id`, `account`, `contact`, `jobTitle`), of one contact
        and/or one account (`GET /accountContacts?filters[contact]=&filters[account]=`, offset
        paging). A contact belongs to one account at most."""
        params: dict[str, Any] = {}
        if contact_id is not None:
            params["filters[contact]"] = str(contact_id)
        if account_id is not None:
            params["filters[account]"] = str(account_id)
        for row in self.iter_items("accountContacts", "accountContacts", params=params):
            yield _string_ids(row, _ACCOUNT_CONTACT_IDS)

    def associate_contact(
        self, account_id: str | int, contact_id: str | int, *, job_title: str | None = None
    ) -> dict[str, Any]:
        """`POST /accountContacts`: put a contact on an account; returns the association.

        A contact already on an account (this one or another) raises `ClientError` (422, code
        `field_invalid`): move it with `update_account_contact`. A missing contact or account
        is a `NotFoundError`. An association whose answer was lost is looked up before the
        request is sent again.
        """
        association: dict[str, Any] = {"contact": str(contact_id), "account": str(account_id)}
        if job_title is not None:
            association["jobTitle"] = job_title
        body = {"accountContact": association}
        try:
            created = self.request_json("POST", f"{API}/accountContacts", json=body)
        except ApiConnectionError:
            for row in self.list_account_contacts(contact_id=contact_id):
                if row.get("account") == str(account_id):
                    return row
            created = self.request_json("POST", f"{API}/accountContacts", json=body)
        return _string_ids(created["accountContact"], _ACCOUNT_CONTACT_IDS)

    def update_account_contact(
        self,
        association_id: str | int,
        *,
        job_title: str | None = None,
        account_id: str | int | None = None,
    ) -> dict[str, Any]:
        """`PUT /accountContacts/{id}`: change the job title, or move the contact to another
        account; returns the association."""
        changes: dict[str, Any] = {}
        if job_title is not None:
            changes["jobTitle"] = job_title
        if account_id is not None:
            changes["account"] = str(account_id)
        body = self.request_json(
            "PUT", f"{API}/accountContacts/{association_id}", json={"accountContact": changes}
        )
        return _string_ids(body["accountContact"], _ACCOUNT_CONTACT_IDS)

    def remove_account_contact(self, association_id: str | int) -> bool:
        """`DELETE /accountContacts/{id}` (the association's id); False if it was already gone."""
        try:
            self.request("DELETE", f"{API}/accountContacts/{association_id}")
        except NotFoundError:
            return False
        return True

    # -- pipelines and stages ------------------------------------------------------------------

    def list_pipelines(self, *, title: str | None = None) -> list[dict[str, Any]]:
        """Every pipeline (`GET /dealGroups`, offset paging), or those whose title contains
        `title`. Each carries its stage ids (`stages`) and, added here, the stages AC
        side-loads with it (`dealStages`, in the pipeline's order)."""
        params = {"filters[title]": title} if title is not None else None
        pipelines: list[dict[str, Any]] = []
        stages: dict[str, dict[str, Any]] = {}
        for page in self._pages("dealGroups", "dealGroups", params=params):
            pipelines += page.get("dealGroups") or []
            for stage in page.get("dealStages") or []:
                stages[str(stage["id"])] = _string_ids(stage, _STAGE_IDS)
        return [_pipeline(pipeline, stages) for pipeline in pipelines]

    def create_pipeline(self, title: str, currency: str = "usd") -> dict[str, Any]:
        """`POST /dealGroups` (all users and user groups allowed); returns the pipeline with
        the three stages AC gives a new one (`dealStages`: To Contact, In Contact, Follow Up).
        `currency` is the lowercase ISO code of new deals (sent lowercased). Titles need not
        be unique, so a create whose answer was lost is not sent again."""
        group = {"title": title, "currency": currency.lower(), "allgroups": 1, "allusers": 1}
        body = self.request_json("POST", f"{API}/dealGroups", json={"dealGroup": group})
        stages = {
            str(stage["id"]): _string_ids(stage, _STAGE_IDS)
            for stage in body.get("dealStages") or []
        }
        return _pipeline(body["dealGroup"], stages)

    def list_stages(self, pipeline_id: str | int | None = None) -> Iterator[dict[str, Any]]:
        """Every stage, or one pipeline's (`GET /dealStages?filters[d_groupid]=`, offset
        paging): `id`, `group` (the pipeline), `title`, `order`..."""
        params = {"filters[d_groupid]": str(pipeline_id)} if pipeline_id is not None else None
        for stage in self.iter_items("dealStages", "dealStages", params=params):
            yield _string_ids(stage, _STAGE_IDS)

    def create_stage(
        self, pipeline_id: str | int, title: str, *, order: int | None = None
    ) -> dict[str, Any]:
        """`POST /dealStages`: a stage of the pipeline, last unless `order` is given; returns
        it. Not sent again when its answer was lost."""
        stage: dict[str, Any] = {"title": title, "group": str(pipeline_id)}
        if order is not None:
            stage["order"] = order
        body = self.request_json("POST", f"{API}/dealStages", json={"dealStage": stage})
        return _string_ids(body["dealStage"], _STAGE_IDS)

    # -- deals ---------------------------------------------------------------------------------

    def list_deals(
        self,
        *,
        updated_after: datetime | None = None,
        stage: str | int | None = None,
        pipeline: str | int | None = None,
        status: int | None = None,
        search: str | None = None,
        page_size: int = MAX_PAGE,
    ) -> Iterator[dict[str, Any]]:
        """Deals matching every filter given (`GET /deals`, offset paging in AC's default order).

        `status`: 0 open, 1 won, 2 lost. `search`: `filters[search]` (title, contact,
        organization). `updated_after` returns exactly the deals whose `mdate` is at or after
        it (to the second): like `list_contacts`, AC is sent a bound early enough under every
        reading of its date filter and what it returns in excess is dropped here. Numbers
        (`value` in cents, `status`) come as AC writes them, usually strings.
        """
        params: list[tuple[str, Any]] = []
        if updated_after is not None:
            bound = updated_after_bound(updated_after, self.account_offset)
            params.append(("filters[updated_after]", bound))
        for key, value in (("stage", stage), ("group", pipeline), ("status", status)):
            if value is not None:
                params.append((f"filters[{key}]", str(value)))
        if search is not None:
            params.append(("filters[search]", search))
        floor = _utc(updated_after).replace(microsecond=0) if updated_after else None
        for deal in self.iter_items("deals", "deals", params=params, page_size=page_size):
            self._note_offset(deal.get("cdate"))
            modified = _parse_time(deal.get("mdate"))
            if floor is None or modified == datetime.min.replace(tzinfo=UTC) or modified >= floor:
                yield _deal(deal)

    def get_deal(self, deal_id: str | int) -> dict[str, Any] | None:
        """One deal (`GET /deals/{id}`), None if it does not exist."""
        try:
            body = self.request_json("GET", f"{API}/deals/{deal_id}")
        except NotFoundError:
            return None
        deal = (body or {}).get("deal")
        return _deal(deal) if deal is not None else None

    def create_deal(
        self,
        title: str,
        *,
        value: int,
        currency: str | None = None,
        pipeline: str | int | None = None,
        stage: str | int | None = None,
        owner: str | int | None = None,
        contact: str | int | None = None,
        account: str | int | None = None,
        status: int | None = None,
        description: str | None = None,
        percent: int | None = None,
        fields: Iterable[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """`POST /deals`; returns the deal (with its custom `fields`).

        `value` is in cents, an int (`45678` for 456.78; anything else raises `TypeError`
        before sending). `currency` is sent lowercased (AC wants the lowercase ISO code;
        default: the pipeline's). Give `contact` or `account` (or both), and `pipeline` or
        `stage` (a pipeline alone puts the deal in its first stage). `status`: 0 open, 1 won,
        2 lost. `fields`: `[{"customFieldId": "1", "fieldValue": "x"}]`. AC refuses a bad deal
        with one `ClientError` (422, codes `field_missing` / `field_invalid`). Deals have no
        natural key, so a create whose answer was lost is not sent again.
        """
        deal: dict[str, Any] = {"title": title, "value": _cents(value)}
        optional: dict[str, Any] = {
            "currency": currency.lower() if currency is not None else None,
            "group": pipeline,
            "stage": stage,
            "owner": owner,
            "contact": contact,
            "account": account,
        }
        deal.update({key: str(v) for key, v in optional.items() if v is not None})
        for key, number in (("status", status), ("percent", percent)):
            if number is not None:
                deal[key] = number
        if description is not None:
            deal["description"] = description
        if fields is not None:
            deal["fields"] = list(fields)
        body = self.request_json("POST", f"{API}/deals", json={"deal": deal})
        return _deal(body["deal"])

    def update_deal(self, deal_id: str | int, **attributes: Any) -> dict[str, Any]:
        """`PUT /deals/{id}` with AC's attribute names (`title`, `value` in cents, `currency`,
        `group`, `stage`, `owner`, `contact`, `account`, `status`, `percent`, `description`,
        `fields`: custom values are upserted); returns the deal. AC moves its `mdate` on every
        update. `value` must be an int and `currency` is sent lowercased, as in `create_deal`."""
        changes = dict(attributes)
        if "value" in changes:
            changes["value"] = _cents(changes["value"])
        if isinstance(changes.get("currency"), str):
            changes["currency"] = changes["currency"].lower()
        body = self.request_json("PUT", f"{API}/deals/{deal_id}", json={"deal": changes})
        return _deal(body["deal"])

    def delete_deal(self, deal_id: str | int) -> bool:
        """`DELETE /deals/{id}`; False when the deal was already gone (404)."""
        try:
            self.request("DELETE", f"{API}/deals/{deal_id}")
        except NotFoundError:
            return False
        return True

    # -- custom fields of deals and accounts ---------------------------------------------------

    def list_deal_fields(self) -> list[dict[str, Any]]:
        """Every custom deal field (`GET /dealCustomFieldMeta`: `id`, `fieldLabel`, `fieldType`,
        `fieldOptions`, `fieldDefaultCurrency`...)."""
        return self._list_custom_fields(_DEAL_FIELDS)

    def create_deal_field(
        self,
        label: str,
        field_type: str = "text",
        *,
        options: Iterable[str] | None = None,
        default: Any = None,
        default_currency: str | None = None,
        form_visible: bool = True,
    ) -> dict[str, Any]:
        """`POST /dealCustomFieldMeta`; returns the field. `field_type`: text, textarea, date,
        datetime, dropdown, multiselect, radio, checkbox, hidden, currency or number;
        `options` for the choice types, `default_currency` for a currency field. A missing
        label or type is a `ClientError` (422). Labels need not be unique, so a create whose
        answer was lost is not sent again."""
        return self._create_custom_field(
            _DEAL_FIELDS, label, field_type, options, default, default_currency, form_visible
        )

    def deal_field_values(self, deal_id: str | int) -> list[dict[str, Any]]:
        """One deal's custom field values (`GET /dealCustomFieldData?filters[dealId]=`:
        `id`, `customFieldId`, `fieldValue`, `fieldCurrency`...)."""
        return self._custom_values(_DEAL_FIELDS, deal_id)

    def set_deal_field_value(
        self,
        deal_id: str | int,
        field_id: str | int,
        value: Any,
        *,
        currency: str | None = None,
    ) -> dict[str, Any]:
        """Set one custom field of a deal; returns the value (`dealCustomFieldDatum`).

        AC keeps one value per deal and field: the deal's values are read first, then the
        existing one is changed (`PUT /dealCustomFieldData/{id}`) or a new one created
        (`POST /dealCustomFieldData`). Unlike `update_deal(fields=)`, this leaves the deal's
        `mdate` alone. Formats: dates `YYYY-MM-DD`, currency amounts in cents with
        `currency`, multi-values a list. A value the field's type refuses is a `ClientError`
        (422)."""
        return self._set_custom_value(_DEAL_FIELDS, deal_id, field_id, value, currency)

    def list_account_fields(self) -> list[dict[str, Any]]:
        """Every custom account field (`GET /accountCustomFieldMeta`)."""
        return self._list_custom_fields(_ACCOUNT_FIELDS)

    def create_account_field(
        self,
        label: str,
        field_type: str = "text",
        *,
        options: Iterable[str] | None = None,
        default: Any = None,
        default_currency: str | None = None,
        form_visible: bool = True,
    ) -> dict[str, Any]:
        """`POST /accountCustomFieldMeta`; returns the field (as `create_deal_field`)."""
        return self._create_custom_field(
            _ACCOUNT_FIELDS, label, field_type, options, default, default_currency, form_visible
        )

    def account_field_values(self, account_id: str | int) -> list[dict[str, Any]]:
        """One account's custom field values
        (`GET /accountCustomFieldData?filters[customerAccountId]=`)."""
        return self._custom_values(_ACCOUNT_FIELDS, account_id)

    def set_account_field_value(
        self,
        account_id: str | int,
        field_id: str | int,
        value: Any,
        *,
        currency: str | None = None,
    ) -> dict[str, Any]:
        """Set one custom field of an account (`PUT` or `POST /accountCustomFieldData`, as
        `set_deal_field_value`); leaves the account's `updatedTimestamp` alone."""
        return self._set_custom_value(_ACCOUNT_FIELDS, account_id, field_id, value, currency)

    def _list_custom_fields(self, kind: _FieldKind) -> list[dict[str, Any]]:
        return [
            _string_ids(field, _FIELD_META_IDS)
            for field in self.iter_items(kind.meta_path, kind.meta_path)
        ]

    def _create_custom_field(
        self,
        kind: _FieldKind,
        label: str,
        field_type: str,
        options: Iterable[str] | None,
        default: Any,
        default_currency: str | None,
        form_visible: bool,
    ) -> dict[str, Any]:
        field: dict[str, Any] = {
            "fieldLabel": label,
            "fieldType": field_type,
            "isFormVisible": int(form_visible),
        }
        if options is not None:
            field["fieldOptions"] = list(options)
        if default is not None:
            field["fieldDefault"] = default
        if default_currency is not None:
            field["fieldDefaultCurrency"] = default_currency.lower()
        body = self.request_json("POST", f"{API}/{kind.meta_path}", json={kind.metum: field})
        return _string_ids(body[kind.metum], _FIELD_META_IDS)

    def _custom_values(self, kind: _FieldKind, owner_id: str | int) -> list[dict[str, Any]]:
        params = {f"filters[{kind.owner_key}]": str(owner_id)}
        return [
            _string_ids(datum, _FIELD_DATUM_IDS)
            for datum in self.iter_items(kind.data_path, kind.data_path, params=params)
        ]

    def _custom_value_id(
        self, kind: _FieldKind, owner_id: str | int, field_id: str | int
    ) -> str | None:
        for datum in self._custom_values(kind, owner_id):
            if datum.get("customFieldId") == str(field_id):
                return str(datum["id"])
        return None

    def _set_custom_value(
        self,
        kind: _FieldKind,
        owner_id: str | int,
        field_id: str | int,
        value: Any,
        currency: str | None,
    ) -> dict[str, Any]:
        datum: dict[str, Any] = {"fieldValue": value}
        if currency is not None:
            datum["fieldCurrency"] = currency.lower()
        existing = self._custom_value_id(kind, owner_id, field_id)
        if existing is None:
            new = {kind.owner_key: str(owner_id), "customFieldId": str(field_id), **datum}
            path = f"{API}/{kind.data_path}"
            try:
                body = self.request_json("POST", path, json={kind.datum: new})
                return _string_ids(body[kind.datum], _FIELD_DATUM_IDS)
            except (ApiConnectionError, ClientError) as error:
                if isinstance(error, ClientError) and error.status != 422:
                    raise
                # Written meanwhile (422: the value exists), or maybe written before the
                # answer was lost: look again before sending.
                existing = self._custom_value_id(kind, owner_id, field_id)
                if existing is None:
                    if isinstance(error, ClientError):
                        raise
                    body = self.request_json("POST", path, json={kind.datum: new})
                    return _string_ids(body[kind.datum], _FIELD_DATUM_IDS)
        body = self.request_json(
            "PUT", f"{API}/{kind.data_path}/{existing}", json={kind.datum: datum}
        )
        return _string_ids(body[kind.datum], _FIELD_DATUM_IDS)

    def _pages(
        self,
        path: str,
        items_key: str,
        *,
        params: dict[str, Any] | None = None,
        page_size: int = MAX_PAGE,
    ) -> Iterator[dict[str, Any]]:
        """Every page body of a list endpoint (offset paging), side-loaded objects included."""
        endpoint = f"{API}/{path.lstrip('/')}"
        paginator = OffsetPaginator(
            items_key, limit=page_size, service=self.service, endpoint=endpoint
        )
        base = list((params or {}).items())

        def fetch(token: Any | None) -> dict[str, Any]:
            query = base + list(paginator.params(token).items())
            return self.request_json("GET", endpoint, params=query) or {}

        yield from iterate_pages(fetch, paginator)

    # -- webhooks ------------------------------------------------------------------------------

    def list_webhooks(
        self, *, name: str | None = None, url: str | None = None
    ) -> list[dict[str, Any]]:
        """Every webhook (`id`, `name`, `url`, `events`, `sources`, `listid`...), or those with
        exactly this name (`filters[name]`) and URL. The URL is compared here, not sent as
        `filters[url]`: a receiver's URL may hold its secret, and request lines are logged."""
        params = {"filters[name]": name} if name is not None else None
        return [
            _string_ids(hook, _WEBHOOK_IDS)
            for hook in self.iter_items("webhooks", "webhooks", params=params)
            if (name is None or hook.get("name") == name)
            and (url is None or hook.get("url") == url)
        ]

    def create_webhook(
        self, name: str, url: str, events: Iterable[str], sources: Iterable[str]
    ) -> dict[str, Any]:
        """`POST /webhooks` (any list); returns the webhook. Not resent after a lost answer:
        names need not be unique, so a resend could register it twice."""
        webhook = {"name": name, "url": url, "events": list(events), "sources": list(sources)}
        body = self.request_json("POST", f"{API}/webhooks", json={"webhook": webhook})
        return _string_ids(body["webhook"], _WEBHOOK_IDS)

    def delete_webhook(self, webhook_id: str | int) -> bool:
        """`DELETE /webhooks/{id}`; False when it was already gone (404)."""
        try:
            self.request("DELETE", f"{API}/webhooks/{webhook_id}")
        except NotFoundError:
            return False
        return True

    # -- bulk import ---------------------------------------------------------------------------

    def bulk_import(
        self,
        contacts: list[dict[str, Any]],
        *,
        chunk_size: int = MAX_IMPORT_CHUNK,
        resolve_ids: bool = True,
    ) -> list[ImportResult]:
        """Import contacts (bulk_import shape: `email`, `first_name`, `tags`, `fields`...).

        Returns one `ImportResult` per input row, in input order (see `iter_bulk_import`).
        """
        results: dict[int, ImportResult] = {}
        for batch in self.iter_bulk_import(
            contacts, chunk_size=chunk_size, resolve_ids=resolve_ids
        ):
            results.update((result.index, result) for result in batch)
        return [results[i] for i in range(len(contacts))]

    def iter_bulk_import(
        self,
        contacts: Iterable[dict[str, Any]],
        *,
        chunk_size: int = MAX_IMPORT_CHUNK,
        resolve_ids: bool = True,
    ) -> Iterator[list[ImportResult]]:
        """Import contacts in chunks of at most 250, yielding each chunk's results once AC has
        applied it, while later chunks are still being sent.

        `contacts` may be a lazy stream: it is read a chunk at a time, just before the chunk is
        sent, so a caller can prepare its next rows while earlier chunks wait for their turn,
        and one call can carry a whole run with no pause between its parts. A result's `index`
        is the row's position in the stream.

        Chunks go out at the account's import limit (100 per minute, never 101 in any minute)
        with up to `max_in_flight` sent and not yet applied; `import/info` is asked about the
        oldest one in flight each `import_poll_interval` seconds (AC applies batches in order).
        Rows without an email or rejected at submission are yielded as failures at once; the
        rest of their chunk is sent again. With `resolve_ids` each successful row gets its
        contact id from `GET /contacts?ids[]=` (about three more requests per chunk, which at 5
        requests/s keeps imports well under 100 per minute); without, a row is successful
        unless `import/info` lists its email as failed, and `contact_id` stays None.
        """
        if not 1 <= chunk_size <= MAX_IMPORT_CHUNK:
            raise ValueError(f"chunk_size must be between 1 and {MAX_IMPORT_CHUNK}")
        # The connection names the account, whose import budget every hook on it shares: it
        # must be in place before the first import counts against it.
        self.get_conn()
        started = time.monotonic()
        totals = {"rows": 0, "ok": 0, "failed": 0, "batches": 0}

        def counted(batch: list[ImportResult]) -> list[ImportResult]:
            totals["ok"] += sum(r.ok for r in batch)
            totals["failed"] += sum(not r.ok for r in batch)
            return batch

        rows = enumerate(contacts)
        in_flight: deque[_ImportBatch] = deque()
        while True:
            chunk: dict[int, dict[str, Any]] = {}
            missing: list[ImportResult] = []
            try:
                for index, contact in rows:
                    totals["rows"] += 1
                    if str(contact.get("email") or "").strip():
                        chunk[index] = contact
                        if len(chunk) == chunk_size:
                            break
                    else:
                        missing.append(ImportResult(index, "", False, error="missing email"))
            except Exception:
                # The caller's stream failed: the batches AC already took are answered first,
                # so that the caller can record them (a retry would send them again).
                if missing:
                    yield counted(missing)
                yield from map(counted, self._completed_imports(in_flight, resolve_ids, wait=True))
                raise
            if missing:
                yield counted(missing)
            if not chunk:
                break
            batch, rejected = self._submit_import(chunk)
            if rejected:
                yield counted(rejected)
            if batch is not None:
                totals["batches"] += 1
                in_flight.append(batch)
            for done in self._completed_imports(in_flight, resolve_ids, wait=False):
                yield counted(done)
            if len(in_flight) >= self.max_in_flight:  # AC lags: hold no more rows than this
                keep = self.max_in_flight - 1
                for done in self._completed_imports(in_flight, resolve_ids, wait=True, keep=keep):
                    yield counted(done)
        for done in self._completed_imports(in_flight, resolve_ids, wait=True):
            yield counted(done)
        log.info(
            "bulk_import: %d contacts in %d batches, %d ok, %d failed, %.1f s",
            totals["rows"],
            totals["batches"],
            totals["ok"],
            totals["failed"],
            time.monotonic() - started,
        )

    def _submit_import(
        self, contacts: dict[int, dict[str, Any]]
    ) -> tuple[_ImportBatch | None, list[ImportResult]]:
        """Queue one chunk (the rows by their index); rows named in `failureReasons` are
        reported and the rest re-sent."""
        attempts = 0
        rejected: list[ImportResult] = []
        chunk = list(contacts)
        while chunk:
            try:
                with self.import_budget.call():
                    body = self.request_json(
                        "POST",
                        f"{API}/import/bulk_import",
                        json={"contacts": [contacts[i] for i in chunk]},
                        replay_safe=True,
                    )
                sent = time.monotonic()
                batch = {i: contacts[i] for i in chunk}
                return _ImportBatch(str(body["batchId"]), batch, sent, sent), rejected
            except ClientError as error:
                if error.status != 400:
                    raise
                reasons = _failure_reasons(error)
                attempts += 1
                if (
                    "rate limit" in error.message.lower()
                    and attempts < self.retry_policy.max_attempts
                ):
                    self.import_budget.pause(60.0)
                    continue
                # `contact` is a position in the request, 0- or 1-based (undocumented): both
                # readings' rows are set aside as suspects, for the caller to write one by one.
                bad = {
                    chunk[q]: r
                    for p, r in reasons.items()
                    for q in (p, p - 1)
                    if 0 <= q < len(chunk)
                }
                if not bad:
                    raise
                rejected += [
                    ImportResult(
                        index,
                        contacts[index]["email"],
                        False,
                        error=mask_emails(reason),
                        suspect=True,
                    )
                    for index, reason in bad.items()
                ]
                chunk = [i for i in chunk if i not in bad]
        return None, rejected

    def _completed_imports(
        self,
        in_flight: deque[_ImportBatch],
        resolve_ids: bool,
        *,
        wait: bool,
        keep: int = 0,
    ) -> Iterator[list[ImportResult]]:
        """Results of the batches that completed, oldest first. Without `wait`, stop at the
        first batch not due for a poll or still processing (the caller has more to send); with
        `wait`, once at most `keep` are left in flight."""
        while len(in_flight) > (keep if wait else 0):
            batch = in_flight[0]
            delay = batch.last_asked + self.import_poll_interval - time.monotonic()
            if delay > 0:
                if not wait:
                    return
                time.sleep(delay)
            info = self._import_info(batch)
            if info is None:
                batch.last_asked = time.monotonic()
                if not wait:
                    return
                continue
            in_flight.popleft()
            yield self._map_import(batch.contacts, info, resolve_ids)

    def _import_info(self, batch: _ImportBatch) -> dict[str, Any] | None:
        """`import/info` of one batch: its answer once completed, None while processing."""
        info = self.request_json("GET", f"{API}/import/info", params={"batchId": batch.batch_id})
        status = str(info.get("status", "")).lower()
        if status == "completed":
            return dict(info)
        if "fail" in status or "error" in status:
            raise BulkImportError(
                f"import batch ended with status {status!r}",
                service=self.service,
                method="GET",
                endpoint=f"{API}/import/info",
            )
        if time.monotonic() - batch.sent > self.import_timeout:
            raise BulkImportError(
                f"import batch not completed after {self.import_timeout:.0f} s",
                service=self.service,
                method="GET",
                endpoint=f"{API}/import/info",
            )
        return None

    def _map_import(
        self,
        accepted: dict[int, dict[str, Any]],
        info: dict[str, Any],
        resolve_ids: bool,
    ) -> list[ImportResult]:
        """Per-row results from `import/info`: failures come back as emails, successes as ids."""
        failed = {str(e).strip().lower() for e in info.get("failure") or []}
        success_ids = [str(i) for i in info.get("success") or []]
        emails = [str(contact["email"]) for contact in accepted.values()]
        succeeded = sum(e.strip().lower() not in failed for e in emails)
        # Ids are needed when asked for, or when the counts disagree: then the ids say who made it.
        resolve = resolve_ids or len(success_ids) != succeeded
        by_email = {
            str(c.get("email", "")).strip().lower(): str(c["id"])
            for c in self.list_contacts(ids=success_ids)
        } if resolve and success_ids else {}  # fmt: skip
        results = []
        for index, email in zip(accepted, emails, strict=True):
            key = email.strip().lower()
            if key in failed:
                results.append(ImportResult(index, email, False, error="rejected by the import"))
                continue
            if not resolve:
                results.append(ImportResult(index, email, True))
                continue
            contact_id = by_email.get(key)
            if contact_id is None:
                found = self.find_contact_by_email(email)
                contact_id = str(found["id"]) if found else None
            if contact_id is None:
                results.append(
                    ImportResult(index, email, False, error="not found after the import completed")
                )
            else:
                results.append(ImportResult(index, email, True, contact_id=contact_id))
        return results


@dataclass
class _Second:
    """One second of a tag's associations met at a page's end: its time as AC wrote it, where
    its rows begin in the order, and the association ids read of it so far."""

    moment: datetime
    stamp: str
    start: int
    ids: set[str]


@dataclass
class _ImportBatch:
    """A submitted import batch: its rows by index, when it was sent, and when it was last asked
    about."""

    batch_id: str
    contacts: dict[int, dict[str, Any]]
    sent: float
    last_asked: float


@dataclass(frozen=True)
class _FieldKind:
    """The deal or the account flavour of AC's custom field resources: `<name>CustomFieldMeta`
    (the fields) and `<name>CustomFieldData` (their values, keyed by `owner_key`)."""

    name: str
    owner_key: str

    @property
    def meta_path(self) -> str:
        return f"{self.name}CustomFieldMeta"

    @property
    def data_path(self) -> str:
        return f"{self.name}CustomFieldData"

    @property
    def metum(self) -> str:
        return f"{self.name}CustomFieldMetum"

    @property
    def datum(self) -> str:
        return f"{self.name}CustomFieldDatum"


_DEAL_FIELDS = _FieldKind("deal", "dealId")
_ACCOUNT_FIELDS = _FieldKind("account", "customerAccountId")

# The keys that hold ids, made strings whatever JSON type AC answers with (its examples show
# both: the deal a POST /deals answers carries numbers, the lists strings).
_ACCOUNT_IDS = ("id",)
_ACCOUNT_CONTACT_IDS = ("id", "account", "contact")
_STAGE_IDS = ("id", "group")
_DEAL_IDS = (
    "id", "owner", "contact", "organization", "account", "customerAccount", "group", "stage",
)  # fmt: skip
_FIELD_META_IDS = ("id",)
_WEBHOOK_IDS = ("id", "listid")
_FIELD_DATUM_IDS = (
    "id", "customFieldId", "dealId", "accountId", "customerAccountId", "dealCustomFieldMetumId",
    "accountCustomFieldMetumId",
)  # fmt: skip


def _string_ids(record: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `record` with the ids under `keys` as strings (None stays None); a record's
    custom `fields` echo gets the same treatment."""
    shaped = dict(record)
    for key in keys:
        value = shaped.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            shaped[key] = str(value)
    if isinstance(shaped.get("fields"), list):
        shaped["fields"] = [
            _string_ids(item, _FIELD_DATUM_IDS) if isinstance(item, dict) else item
            for item in shaped["fields"]
        ]
    return shaped


def _deal(deal: dict[str, Any]) -> dict[str, Any]:
    return _string_ids(deal, _DEAL_IDS)


def _pipeline(pipeline: dict[str, Any], stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A pipeline with string ids and its side-loaded stages attached as `dealStages`."""
    shaped = _string_ids(pipeline, ("id",))
    ids = [str(i) for i in shaped.get("stages") or []]
    shaped["stages"] = ids
    shaped["dealStages"] = [stages[i] for i in ids if i in stages]
    return shaped


def _cents(value: Any) -> int:
    """A deal value in cents: an int (not a float, a string or a bool), so an amount in whole
    currency units cannot be sent by mistake."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"a deal value is an int number of cents, not {type(value).__name__}")
    return value


def _common_prefix(names: list[str]) -> str:
    """The longest string every one of `names` starts with."""
    first, last = min(names), max(names)
    size = next(
        (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b),
        min(len(first), len(last)),
    )
    return first[:size]


def _failure_reasons(error: ClientError) -> dict[int, str]:
    body = error.body if isinstance(error.body, dict) else {}
    reasons: dict[int, str] = {}
    for item in body.get("failureReasons") or []:
        if isinstance(item, dict) and "contact" in item:
            try:
                reasons[int(item["contact"])] = str(item.get("failureReason") or "invalid")
            except (TypeError, ValueError):
                continue
    return reasons


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def updated_after_bound(since: datetime, account_offset: timedelta | None) -> str:
    """The `filters[updated_after]` value that returns every contact updated at or after `since`
    however AC reads it (UNCONFIRMED, reference §2.4): as an instant, as a wall-clock time in
    the account's zone (offset ignored), or as a date there.

    `since` (floored to the second) is written at the account's offset less an hour for a DST
    change, or at UTC-12 when the offset is unknown: its wall-clock time and date are then never
    later than the account's own, and the offset it carries keeps the instant exact.
    """
    offset = EARLIEST_OFFSET if account_offset is None else account_offset - DST_SHIFT
    return _utc(since).astimezone(timezone(offset)).isoformat(timespec="seconds")


def _parse_time(value: Any) -> datetime:
    try:
        return _utc(datetime.fromisoformat(str(value)))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
