"""Collection reads: `$filter`/`$orderby`/`$top`/`$count`, keyset paging with `$skiptoken`, and
change tracking with delta links (§2.3, §2.4, §3)."""

from __future__ import annotations

import base64
import calendar
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from sandbox.dataverse import errors
from sandbox.dataverse.errors import DataverseError, bad_request
from sandbox.dataverse.formatting import Annotations, LookupName, RowFormatter
from sandbox.dataverse.odata import (
    SqlCompiler,
    entity_resolver,
    parse_filter,
    parse_orderby,
    parse_select,
)
from sandbox.dataverse.schema import Entity
from sandbox.dataverse.settings import SettingsHolder
from sandbox.dataverse.store import Store

MAX_PAGE = 5000
COUNT_CAP = 5000
OPTIONS = {
    "$select", "$filter", "$orderby", "$top", "$count", "$expand", "$apply", "$skiptoken",
    "$deltatoken",
}  # fmt: skip
REJECTED = {"$skip", "$search", "$format"}
TRACKING_FORBIDDEN = ("$filter", "$orderby", "$expand", "$top")
TOTAL_COUNT = "Microsoft.Dynamics.CRM.totalrecordcount"
TOTAL_COUNT_EXCEEDED = "Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"


@dataclass
class QueryOptions:
    """The query string of a read: system query options and parameter aliases."""

    raw: str
    options: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: str) -> QueryOptions:
        """Split and check the options (names are case-sensitive; a few are not supported)."""
        parsed = cls(raw)
        for name, value in parse_qsl(raw, keep_blank_values=True):
            if name.startswith("@"):
                parsed.aliases[name] = value
                continue
            if not name.startswith("$"):
                continue
            if name in REJECTED or name not in OPTIONS:
                raise bad_request(f"The query parameter '{name}' is not supported.")
            if name in parsed.options:
                raise bad_request(
                    f"Query option '{name}' was specified more than once, but it must be "
                    "specified at most once."
                )
            parsed.options[name] = value
        return parsed

    def get(self, name: str) -> str | None:
        """An option's value, or None."""
        return self.options.get(name)

    def without_skiptoken(self) -> str:
        """The raw query string minus `$skiptoken`, for building the next link."""
        parts = [
            p for p in self.raw.split("&") if p and not re.match(r"(\$|%24)skiptoken=", p, re.I)
        ]
        return "&".join(parts)


@dataclass(frozen=True)
class Prefs:
    """The `Prefer` header, parsed."""

    max_page_size: int | None = None
    track_changes: bool = False
    annotations: str | None = None
    return_representation: bool = False
    continue_on_error: bool = False

    @classmethod
    def parse(cls, header: str | None) -> Prefs:
        """Read the comma-separated preferences (unknown ones are ignored, as HTTP says)."""
        values: dict[str, Any] = {}
        for item in _split_prefer(header or ""):
            name, _, value = item.partition("=")
            name = name.strip().lower()
            value = value.strip().strip('"')
            if name == "odata.maxpagesize":
                try:
                    size = int(value)
                except ValueError:
                    continue
                if size > 0:
                    values["max_page_size"] = min(size, MAX_PAGE)
            elif name == "odata.track-changes":
                values["track_changes"] = True
            elif name == "odata.include-annotations":
                values["annotations"] = value
            elif name == "return" and value == "representation":
                values["return_representation"] = True
            elif name == "odata.continue-on-error":
                values["continue_on_error"] = True
        return cls(**values)


def _split_prefer(header: str) -> list[str]:
    # Commas inside a quoted annotation list do not separate preferences.
    items, current, quoted = [], "", False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [i.strip() for i in items if i.strip()]


def encode_skiptoken(page: int, state: dict[str, Any], tracking: bool = False) -> str:
    """An opaque paging cookie shaped like Dataverse's (`<cookie pagenumber=... />`)."""
    inner = base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode()
    flag = "True" if tracking else "False"
    return (
        f'<cookie pagenumber="{page}" pagingcookie="{quote(inner, safe="")}" istracking="{flag}" />'
    )


def decode_skiptoken(token: str) -> tuple[int, dict[str, Any]]:
    """The page number and state inside a `$skiptoken`."""
    match = re.search(r'pagenumber="(\d+)"\s+pagingcookie="([^"]*)"', token)
    if match is None:
        raise _bad_token()
    try:
        state = json.loads(base64.urlsafe_b64decode(unquote(match.group(2))))
    except ValueError:
        raise _bad_token() from None
    if not isinstance(state, dict):
        raise _bad_token()
    return int(match.group(1)), state


def _bad_token() -> DataverseError:
    return bad_request("The $skiptoken value is not valid.", errors.INVALID_ARGUMENT)


def delta_token(version: int, now: float | None = None) -> str:
    """A delta token: the row version reached and when (opaque to clients)."""
    stamp = time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(now if now is not None else time.time()))
    return f"{version}!{stamp}"


def parse_delta_token(token: str, expiry_seconds: int) -> int:
    """The version in a delta token; expired or malformed tokens are errors."""
    match = re.fullmatch(r"(\d+)!(\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2})", token.strip())
    if match is None:
        raise bad_request("The $deltatoken value is not valid.", errors.INVALID_ARGUMENT)
    issued = calendar.timegm(time.strptime(match.group(2), "%m/%d/%Y %H:%M:%S"))
    if time.time() - issued > expiry_seconds:
        raise bad_request(
            "Version stamp associated with the client has expired. Please perform a full sync.",
            errors.EXPIRED_VERSION_STAMP,
        )
    return int(match.group(1))


@dataclass
class Page:
    """One answer of a collection read."""

    body: dict[str, Any]
    applied: list[str]
    rows: int


class Reader:
    """Runs collection reads for one request (the API base URL depends on the request)."""

    def __init__(
        self, store: Store, settings: SettingsHolder, api_base: str, lookup_name: LookupName
    ) -> None:
        self.store = store
        self.settings = settings
        self.api_base = api_base
        self.lookup_name = lookup_name

    def _select(self, entity: Entity, query: QueryOptions) -> list[str] | None:
        raw = query.get("$select")
        if raw is None or raw.strip() in ("", "*"):
            return None
        return parse_select(raw, entity_resolver(entity), entity.type_name)

    def _context(self, entity: Entity, select: list[str] | None, suffix: str = "") -> str:
        cols = f"({','.join(select)})" if select else ""
        return f"{self.api_base}$metadata#{entity.entity_set}{cols}{suffix}"

    def _where(self, entity: Entity, query: QueryOptions) -> tuple[str, list[Any]]:
        raw = query.get("$filter")
        if raw is None:
            return "1", []
        compiler = SqlCompiler(entity)
        sql = compiler.compile(parse_filter(raw, entity, query.aliases))
        return sql, compiler.params

    def count(self, entity: Entity, query: QueryOptions) -> int:
        """`GET /<set>/$count`: matching rows (or changes, with `$deltatoken`), capped at 5,000."""
        token = query.get("$deltatoken")
        if token is not None:
            since = parse_delta_token(token, self.settings.current.change_tracking_expiry_seconds)
            return min(COUNT_CAP, self._change_count(entity, since))
        where, params = self._where(entity, query)
        return min(COUNT_CAP, self._count_where(entity, where, params))

    def _count_where(self, entity: Entity, where: str, params: list[Any]) -> int:
        # One past the cap, so callers can tell "exactly 5,000" from "more than 5,000".
        sql = f"SELECT COUNT(*) FROM (SELECT 1 FROM {entity.entity_set} WHERE {where} LIMIT ?)"
        (value,) = self.store.conn().execute(sql, [*params, COUNT_CAP + 1]).fetchone()
        return int(value)

    def read(self, entity: Entity, query: QueryOptions, prefs: Prefs) -> Page:
        """`GET /<set>`: one page of rows, or change tracking when asked for."""
        if query.get("$expand") is not None:
            raise bad_request("The sandbox does not support $expand.", errors.INVALID_ARGUMENT)
        if query.get("$apply") is not None:
            raise bad_request("The sandbox does not support $apply.", errors.INVALID_ARGUMENT)
        if prefs.track_changes or query.get("$deltatoken") is not None:
            return self._tracked(entity, query, prefs)
        if query.get("$count") not in (None, "true", "false"):
            raise bad_request(f"'{query.get('$count')}' is not a valid count option.")
        select = self._select(entity, query)
        formatter = RowFormatter(entity, select, Annotations(prefs.annotations), self.lookup_name)
        where, filter_params = self._where(entity, query)
        params = list(filter_params)
        resolve = entity_resolver(entity)
        order = parse_orderby(query.get("$orderby") or entity.primary_id, resolve, entity.type_name)
        keys = [(entity.by_json_name(k.name), k.descending) for k in order]
        sort = [
            (f"ci({c.name})" if c.kind in ("string", "memo") else c.name, d) for c, d in keys if c
        ]
        if entity.primary_id not in [expr for expr, _ in sort]:
            sort.append((entity.primary_id, False))
        applied: list[str] = []
        top = _top(query.get("$top"))
        paged = True
        page_size = MAX_PAGE
        if prefs.max_page_size is not None:
            # The docs: with both, $top is ignored.
            page_size = prefs.max_page_size
            applied.append(f"odata.maxpagesize={page_size}")
        elif top is not None:
            page_size = min(top, MAX_PAGE)
            paged = False
        page_number = 1
        conditions = [where]
        token = query.get("$skiptoken")
        if token is not None:
            page_number, state = decode_skiptoken(token)
            values = state.get("k")
            if not isinstance(values, list) or len(values) != len(sort):
                raise _bad_token()
            keyset, keyset_params = _after(sort, values)
            conditions.append(keyset)
            params = [*params, *keyset_params]
        columns = formatter.sql_columns
        sql = (
            f"SELECT {', '.join(columns)}, {', '.join(expr for expr, _ in sort)} "
            f"FROM {entity.entity_set} WHERE {' AND '.join(conditions)} "
            f"ORDER BY {', '.join(f'{e} DESC' if d else e for e, d in sort)} LIMIT ?"
        )
        fetched = self.store.conn().execute(sql, [*params, page_size + 1]).fetchall()
        more = paged and len(fetched) > page_size
        fetched = fetched[:page_size]
        width = len(columns)
        value = [formatter.format_tuple(r[:width]) for r in fetched]
        body: dict[str, Any] = {"@odata.context": self._context(entity, select)}
        if query.get("$count") == "true":
            total = self._count_where(entity, where, filter_params)
            body["@odata.count"] = min(total, COUNT_CAP)
            annotations = Annotations(prefs.annotations)
            if annotations.wants(TOTAL_COUNT):
                body[f"@{TOTAL_COUNT}"] = min(total, COUNT_CAP)
            if annotations.wants(TOTAL_COUNT_EXCEEDED):
                body[f"@{TOTAL_COUNT_EXCEEDED}"] = total > COUNT_CAP
        body["value"] = value
        if more:
            state = {"k": list(fetched[-1][width:])}
            body["@odata.nextLink"] = self._next_link(entity, query, page_number + 1, state)
        if prefs.annotations:
            applied.append(f'odata.include-annotations="{prefs.annotations}"')
        return Page(body, applied, len(value))

    def _next_link(
        self,
        entity: Entity,
        query: QueryOptions,
        page: int,
        state: dict[str, Any],
        tracking: bool = False,
    ) -> str:
        rest = query.without_skiptoken()
        token = quote(encode_skiptoken(page, state, tracking), safe="")
        return f"{self.api_base}{entity.entity_set}?{rest + '&' if rest else ''}$skiptoken={token}"

    def _tracked(self, entity: Entity, query: QueryOptions, prefs: Prefs) -> Page:
        settings = self.settings.current
        if not settings.change_tracking.get(entity.entity_set, False):
            raise bad_request(
                f"Entity {entity.logical_name} isn't enabled for change tracking.",
                errors.CHANGE_TRACKING_OFF,
            )
        for option in TRACKING_FORBIDDEN:
            if query.get(option) is not None:
                raise bad_request(
                    f'The "{option}" query parameter isn\'t supported when Change Tracking is '
                    "enabled.",
                    errors.INVALID_ARGUMENT,
                )
        if query.get("$count") is not None:
            raise bad_request(
                'The "$count" query parameter isn\'t supported when Change Tracking is enabled.',
                errors.INVALID_ARGUMENT,
            )
        select = self._select(entity, query)
        formatter = RowFormatter(entity, select, Annotations(prefs.annotations), self.lookup_name)
        page_size = prefs.max_page_size or MAX_PAGE
        applied = ["odata.track-changes"]
        if prefs.max_page_size is not None:
            applied.append(f"odata.maxpagesize={page_size}")
        if prefs.annotations:
            applied.append(f'odata.include-annotations="{prefs.annotations}"')
        page_number, state = 1, {}
        token = query.get("$skiptoken")
        if token is not None:
            page_number, state = decode_skiptoken(token)
        delta = query.get("$deltatoken")
        if delta is None:
            body = self._snapshot(entity, query, formatter, select, page_size, page_number, state)
        else:
            since = parse_delta_token(delta, settings.change_tracking_expiry_seconds)
            body = self._delta(
                entity, query, formatter, select, since, page_size, page_number, state
            )
        return Page(body, applied, len(body["value"]))

    def _snapshot(
        self,
        entity: Entity,
        query: QueryOptions,
        formatter: RowFormatter,
        select: list[str] | None,
        page_size: int,
        page_number: int,
        state: dict[str, Any],
    ) -> dict[str, Any]:
        # The delta link of a full read starts at the version seen when the read began, so
        # changes made while the client pages are reported by the next delta.
        start = int(state.get("v", self.store.current_version()))
        columns = formatter.sql_columns
        where, params = "1", []
        if "k" in state:
            where, params = f"{entity.primary_id} > ?", [state["k"]]
        rows = (
            self.store.conn()
            .execute(
                f"SELECT {', '.join(columns)} FROM {entity.entity_set} WHERE {where} "
                f"ORDER BY {entity.primary_id} LIMIT ?",
                [*params, page_size + 1],
            )
            .fetchall()
        )
        body: dict[str, Any] = {"@odata.context": self._context(entity, select)}
        body["value"] = [formatter.format_tuple(r) for r in rows[:page_size]]
        if len(rows) > page_size:
            last = body["value"][-1][entity.primary_id]
            body["@odata.nextLink"] = self._next_link(
                entity, query, page_number + 1, {"v": start, "k": last}, tracking=True
            )
        else:
            body["@odata.deltaLink"] = self._delta_link(entity, query, start)
        return body

    def _delta(
        self,
        entity: Entity,
        query: QueryOptions,
        formatter: RowFormatter,
        select: list[str] | None,
        since: int,
        page_size: int,
        page_number: int,
        state: dict[str, Any],
    ) -> dict[str, Any]:
        high = int(state.get("h", self.store.current_version()))
        phase = state.get("p", "u")
        after = int(state.get("a", since))
        conn = self.store.conn()
        value: list[dict[str, Any]] = []
        columns = formatter.sql_columns
        last_version = after
        if phase == "u":
            rows = conn.execute(
                f"SELECT {', '.join(columns)} FROM {entity.entity_set} "
                "WHERE versionnumber > ? AND versionnumber <= ? ORDER BY versionnumber LIMIT ?",
                (after, high, page_size + 1),
            ).fetchall()
            version_at = columns.index("versionnumber")
            for r in rows[:page_size]:
                value.append(formatter.format_tuple(r))
                last_version = r[version_at]
            if len(rows) > page_size:
                return self._delta_page(
                    entity, query, select, value, page_number, high, "u", last_version
                )
            phase, last_version = "d", since
        room = page_size - len(value)
        deleted_context = f"{self.api_base}$metadata#{entity.entity_set}/$deletedEntity"
        tombstones = conn.execute(
            "SELECT id, version FROM tombstones WHERE entity = ? AND version > ? AND version <= ? "
            "ORDER BY version LIMIT ?",
            (entity.entity_set, max(last_version, since), high, room + 1),
        ).fetchall()
        for row_id, version in tombstones[:room]:
            value.append({"@odata.context": deleted_context, "id": row_id, "reason": "deleted"})
            last_version = version
        if len(tombstones) > room:
            return self._delta_page(
                entity, query, select, value, page_number, high, "d", last_version
            )
        body = {"@odata.context": self._context(entity, select, "/$delta"), "value": value}
        body["@odata.deltaLink"] = self._delta_link(entity, query, high)
        return body

    def _delta_page(
        self,
        entity: Entity,
        query: QueryOptions,
        select: list[str] | None,
        value: list[dict[str, Any]],
        page_number: int,
        high: int,
        phase: str,
        last_version: int,
    ) -> dict[str, Any]:
        state = {"h": high, "p": phase, "a": last_version}
        return {
            "@odata.context": self._context(entity, select, "/$delta"),
            "value": value,
            "@odata.nextLink": self._next_link(
                entity, query, page_number + 1, state, tracking=True
            ),
        }

    def _delta_link(self, entity: Entity, query: QueryOptions, version: int) -> str:
        select = query.get("$select")
        prefix = f"$select={quote(select, safe=',')}&" if select else ""
        token = quote(delta_token(version), safe="")
        return f"{self.api_base}{entity.entity_set}?{prefix}$deltatoken={token}"

    def _change_count(self, entity: Entity, since: int) -> int:
        conn = self.store.conn()
        (changed,) = conn.execute(
            f"SELECT COUNT(*) FROM {entity.entity_set} WHERE versionnumber > ?", (since,)
        ).fetchone()
        (deleted,) = conn.execute(
            "SELECT COUNT(*) FROM tombstones WHERE entity = ? AND version > ?",
            (entity.entity_set, since),
        ).fetchone()
        return int(changed) + int(deleted)


def _top(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit():
        raise bad_request(
            f"Invalid value '{raw}' for $top query option found. The $top query option requires "
            "a non-negative integer value."
        )
    return int(raw)


def _after(sort: list[tuple[str, bool]], values: list[Any]) -> tuple[str, list[Any]]:
    """The keyset condition "sorts after the last row of the previous page".

    NULLs sort first ascending and last descending (as in SQL Server and SQLite), so a NULL key
    value needs IS [NOT] NULL tests instead of comparisons.
    """
    alternatives: list[str] = []
    params: list[Any] = []
    for i, (expr, descending) in enumerate(sort):
        value = values[i]
        if value is None and descending:
            continue
        terms: list[str] = []
        for j in range(i):
            prior, prior_value = sort[j][0], values[j]
            if prior_value is None:
                terms.append(f"{prior} IS NULL")
            else:
                terms.append(f"{prior} = ?")
                params.append(prior_value)
        if value is None:
            terms.append(f"{expr} IS NOT NULL")
        elif descending:
            terms.append(f"({expr} < ? OR {expr} IS NULL)")
            params.append(value)
        else:
            terms.append(f"{expr} > ?")
            params.append(value)
        alternatives.append("(" + " AND ".join(terms) + ")")
    if not alternatives:
        return "0", []
    return "(" + " OR ".join(alternatives) + ")", params
