"""The Web API resource tree: routes a request (top-level or inside `$batch`) to reads and writes."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sandbox.dataverse import errors
from sandbox.dataverse.auth import ADMIN_USER_ID, Identity
from sandbox.dataverse.batch import (
    BatchRequest,
    ChangeSet,
    ChangeSetResponse,
    PartResponse,
    parse_batch,
    render_batch,
)
from sandbox.dataverse.errors import (
    DataverseError,
    ServerTimeout,
    bad_request,
    no_resource,
    not_found,
    segment_not_found,
    server_timeout,
    url_too_long,
    version_mismatch,
)
from sandbox.dataverse.formatting import JSON_TYPE, Annotations, RowFormatter, dumps, etag
from sandbox.dataverse.metadata import metadata_response
from sandbox.dataverse.odata import entity_resolver, parse_key, parse_select
from sandbox.dataverse.query import Prefs, QueryOptions, Reader
from sandbox.dataverse.schema import BY_LOGICAL_NAME, ENTITIES, NS, Entity
from sandbox.dataverse.security import full_role, missing_privilege, role_privileges
from sandbox.dataverse.settings import SettingsHolder
from sandbox.dataverse.store import Store
from sandbox.dataverse.writes import CLOSE_ACTIONS, Caller, Writer, qualify_flags

log = logging.getLogger(__name__)

# Nominal execution time (ms) charged to the service-protection window per operation. The
# emulator is far faster than Dataverse; these make the time limit behave like the real one.
COST_MS = {
    "whoami": 2.0,
    "privileges": 5.0,
    "metadata": 5.0,
    "retrieve": 5.0,
    "read": 10.0,
    "read_row": 0.2,
    "write": 20.0,
    "bulk": 10.0,
    "bulk_row": 5.0,
    "qualify": 50.0,
    "batch": 5.0,
    "error": 2.0,
}
MAX_BATCH_URL = 65_536
BULK_ACTIONS = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple")
# The privileges each bulk action needs on its table.
BULK_PRIVILEGES = {
    "CreateMultiple": ("Create",),
    "UpdateMultiple": ("Write",),
    "UpsertMultiple": ("Create", "Write"),
}
# What each QualifyLead flag creates.
QUALIFY_CREATES = {
    "CreateAccount": "accounts",
    "CreateContact": "contacts",
    "CreateOpportunity": "opportunities",
}
_SYSTEMUSER = re.compile(r"systemusers\(([^)]*)\)")
_USER_PRIVILEGES = (f"{NS}.RetrieveUserPrivileges()", f"{NS}.RetrieveUserPrivileges")
# Headers of the `$batch` request itself that also apply to every request inside it.
_INHERITED = (
    "mscrm.suppressduplicatedetection",
    "mscrm.bypasscustompluginexecution",
    "callerobjectid",
)


@dataclass
class Budget:
    """One HTTP request's execution time: what the cost model made the server spend, against the
    server's time limit (a `$batch` shares one budget among its parts)."""

    write_cost_ms: float = 0.0
    timeout_s: float = 120.0
    started: float = field(default_factory=time.monotonic)
    spent_ms: float = 0.0

    def spend(self, records: int) -> None:
        """Spend the execution time of writing `records` records: sleep in this worker thread
        (never inside a transaction, so other requests go on). When that would run past the
        limit, wait until the limit and raise ServerTimeout instead; nothing is written."""
        cost_s = records * self.write_cost_ms / 1000
        now = time.monotonic()
        deadline = self.started + self.timeout_s
        if now + cost_s > deadline:
            wait = max(0.0, deadline - now)
            time.sleep(wait)
            self.spent_ms += wait * 1000
            raise ServerTimeout
        if cost_s > 0:
            time.sleep(cost_s)
            self.spent_ms += cost_s * 1000


@dataclass
class ApiRequest:
    """A Web API request, from HTTP or from a `$batch` part."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    version: str
    user_id: str
    bindings: dict[str, str] = field(default_factory=dict)
    budget: Budget | None = None
    # A part of a `$batch` change set whose time the change set spent before its transaction.
    prepaid: bool = False


@dataclass
class ApiResponse:
    """The answer, plus the execution time charged for it."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    cost_ms: float = 0.0


def json_response(
    status: int, body: Any, cost_ms: float, headers: dict[str, str] | None = None
) -> ApiResponse:
    """A JSON answer with the OData content type."""
    return ApiResponse(status, {"Content-Type": JSON_TYPE, **(headers or {})}, dumps(body), cost_ms)


def error_response(error: DataverseError) -> ApiResponse:
    """An error answer in Dataverse's shape."""
    return json_response(error.status, error.body(), COST_MS["error"], error.headers)


def split_path(path: str) -> list[str]:
    """Path segments, splitting on `/` outside quotes and parentheses (keys may hold a `/`)."""
    segments, current, depth, quoted = [], "", 0, False
    for ch in path:
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == "/" and depth == 0 and not quoted:
            segments.append(current)
            current = ""
        else:
            current += ch
    segments.append(current)
    return [s for s in segments if s != ""]


def _parse_json(body: bytes, entity_set: str) -> Any:
    try:
        return json.loads(body or b"{}")
    except ValueError:
        raise bad_request(
            f"Error identified in Payload provided by the user for Entity :'{entity_set}', "
            "For more information on this error please follow this help link "
            "https://go.microsoft.com/fwlink/?linkid=2195293  ---->  InnerException : "
            "Microsoft.OData.ODataException: Invalid JSON.",
            errors.PAYLOAD,
        ) from None


def _etag_matches(header: str, version: int) -> bool:
    return any(tag.strip() in (etag(version), f'"{version}"') for tag in header.split(","))


class WebApi:
    """Routes and answers Web API requests against the store."""

    def __init__(
        self, store: Store, settings: SettingsHolder, identity: Identity, base_url: str
    ) -> None:
        self.store = store
        self.settings = settings
        self.identity = identity
        self.base_url = base_url.rstrip("/")
        self.user_names = identity.user_names()
        self.writer = Writer(store, settings, self.user_names)

    def api_base(self, version: str) -> str:
        """The service root URL, with a trailing slash."""
        return f"{self.base_url}/api/data/{version}/"

    def lookup_name(self, target: str, row_id: str) -> tuple[str, str | None] | None:
        """The table holding a lookup's target row and the row's display name (for the
        annotations); `target` may list several tables (`account|contact`) for a customer
        lookup. None when no such row exists."""
        if target == "systemuser":
            name = self.user_names.get(row_id)
            return None if name is None else ("systemuser", name)
        for logical_name in target.split("|"):
            entity = BY_LOGICAL_NAME.get(logical_name)
            row = self.store.fetch(entity, row_id) if entity is not None else None
            if entity is not None and row is not None:
                return logical_name, row.get(entity.primary_name)
        return None

    def answer(self, req: ApiRequest) -> ApiResponse:
        """Answer a top-level request; one that ran past the server's time limit answers the
        timeout error (whatever its open transaction held is rolled back)."""
        try:
            return self.handle(req)
        except ServerTimeout:
            return error_response(server_timeout())

    def _spend(self, req: ApiRequest, records: int) -> None:
        if req.budget is not None and not req.prepaid:
            req.budget.spend(records)

    def handle(self, req: ApiRequest) -> ApiResponse:
        """Answer one request; every failure becomes a Dataverse error body."""
        try:
            return self._route(req)
        except DataverseError as exc:
            return error_response(exc)
        except ServerTimeout:
            raise
        except Exception:
            # A bug in the emulator: answer like the service's generic failure, keep the trace.
            log.exception("unexpected error in %s %s", req.method, req.path.split("(")[0])
            return error_response(
                DataverseError(500, errors.UNSPECIFIED, "An unexpected error occurred.")
            )

    def _route(self, req: ApiRequest) -> ApiResponse:
        segments = split_path(req.path)

        if not segments:
            self._require(req, "GET")
            return self._service_document(req)
        head = segments[0]
        if head == "$batch" and len(segments) == 1:
            self._require(req, "POST")
            return self._batch(req)
        if head in ("WhoAmI", "WhoAmI()") and len(segments) == 1:
            self._require(req, "GET")
            return json_response(
                200,
                {
                    "@odata.context": f"{self.api_base(req.version)}$metadata#{NS}.WhoAmIResponse",
                    "BusinessUnitId": self.identity.business_unit_id,
                    "UserId": req.user_id,
                    "OrganizationId": self.identity.organization_id,
                },
                COST_MS["whoami"],
            )
        if len(segments) == 2 and segments[1] in _USER_PRIVILEGES:
            match = _SYSTEMUSER.fullmatch(head)
            if match is not None:
                self._require(req, "GET")
                return self._user_privileges(match.group(1), req)
        action = head[len(NS) + 1 :] if head.startswith(f"{NS}.") else head
        if action in CLOSE_ACTIONS and len(segments) == 1:
            if req.method != "POST":
                raise no_resource(f"{self.api_base(req.version)}{req.path}")
            return self._close_opportunity(action, req)
        if head.startswith("EntityDefinitions"):
            self._require(req, "GET")
            query = QueryOptions.parse(req.query)
            body = metadata_response(
                segments, query.options, self.settings.current, self.api_base(req.version)
            )
            return json_response(200, body, COST_MS["metadata"])
        match = re.fullmatch(r"([A-Za-z_$][\w.]*)(?:\((.*)\))?", head, re.S)
        if match is None or match.group(1) not in ENTITIES:
            raise segment_not_found(match.group(1) if match else head)
        entity = ENTITIES[match.group(1)]
        rest = segments[1:]
        if match.group(2) is None:
            return self._collection(entity, rest, req)
        return self._row(entity, match.group(2), rest, req)

    def _require(self, req: ApiRequest, *methods: str) -> None:
        if req.method not in methods:
            raise DataverseError(
                405,
                errors.ODATA,
                f"The requested resource does not support http method '{req.method}'.",
            )

    def _service_document(self, req: ApiRequest) -> ApiResponse:
        base = self.api_base(req.version)
        value = [{"name": s, "kind": "EntitySet", "url": s} for s in ENTITIES]
        return json_response(200, {"@odata.context": f"{base}$metadata", "value": value}, 1.0)

    def _privileges(self, user_id: str) -> dict[str, str]:
        """The privileges a user holds: the application user's role as configured, the
        interactive admin's every privilege."""
        if user_id == self.identity.app_user_id:
            return self.settings.current.privileges
        return full_role() if user_id == ADMIN_USER_ID else {}

    def _authorize(self, entity: Entity, req: ApiRequest, *operations: str) -> None:
        """403 `PrivilegeDenied` unless the caller holds each `prv<Operation><Table>`."""
        held = self._privileges(req.user_id)
        for operation in operations:
            if f"prv{operation}{entity.schema_name}" not in held:
                raise missing_privilege(req.user_id, operation, entity, len(held))

    def _user_privileges(self, key_text: str, req: ApiRequest) -> ApiResponse:
        """`systemusers(<id>)/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()`."""
        user_id = key_text.strip().lower()
        if user_id not in self.user_names:
            raise not_found("systemuser", user_id)
        base = self.api_base(req.version)
        body = {
            "@odata.context": f"{base}$metadata#{NS}.RetrieveUserPrivilegesResponse",
            "RolePrivileges": role_privileges(
                self._privileges(user_id), self.identity.business_unit_id
            ),
        }
        return json_response(200, body, COST_MS["privileges"])

    def _caller(self, req: ApiRequest) -> Caller:
        suppress = req.headers.get("mscrm.suppressduplicatedetection", "true").strip().lower()
        return Caller(req.user_id, detect_duplicates=suppress == "false")

    def _reader(self, req: ApiRequest) -> Reader:
        return Reader(self.store, self.settings, self.api_base(req.version), self.lookup_name)

    # -- collections -------------------------------------------------------------------------

    def _collection(self, entity: Entity, rest: list[str], req: ApiRequest) -> ApiResponse:
        prefs = Prefs.parse(req.headers.get("prefer"))
        if not rest:
            self._require(req, "GET", "POST")
            if req.method == "POST":
                self._authorize(entity, req, "Create")
                return self._create(entity, req, prefs)
            self._authorize(entity, req, "Read")
            page = self._reader(req).read(entity, QueryOptions.parse(req.query), prefs)
            headers = {"Preference-Applied": ",".join(page.applied)} if page.applied else {}
            cost = COST_MS["read"] + COST_MS["read_row"] * page.rows
            return json_response(200, page.body, cost, headers)
        if rest == ["$count"]:
            self._require(req, "GET")
            self._authorize(entity, req, "Read")
            count = self._reader(req).count(entity, QueryOptions.parse(req.query))
            return ApiResponse(
                200, {"Content-Type": "text/plain"}, str(count).encode(), COST_MS["read"]
            )
        action = rest[0][len(NS) + 1 :] if rest[0].startswith(f"{NS}.") else None
        if len(rest) == 1 and action in BULK_ACTIONS:
            if req.method != "POST":
                raise no_resource(f"{self.api_base(req.version)}{req.path}")
            if not self.settings.current.bulk_operations.get(entity.entity_set, True):
                raise errors.message_not_supported(action, entity.logical_name)
            self._authorize(entity, req, *BULK_PRIVILEGES[action])
            return self._bulk(entity, action, req)
        raise segment_not_found(rest[0])

    def _create(self, entity: Entity, req: ApiRequest, prefs: Prefs) -> ApiResponse:
        body = _parse_json(req.body, entity.entity_set)
        self._spend(req, 1)
        with self.store.transaction() as conn:
            values = self.writer.prepare(entity, body, creating=True, bindings=req.bindings)
            (row,) = self.writer.create(conn, entity, [values], self._caller(req))
        return self._written(entity, row, req, prefs, created=True)

    def _written(
        self, entity: Entity, row: dict[str, Any], req: ApiRequest, prefs: Prefs, *, created: bool
    ) -> ApiResponse:
        row_url = f"{self.api_base(req.version)}{entity.entity_set}({row[entity.primary_id]})"
        if not prefs.return_representation:
            return ApiResponse(204, {"OData-EntityId": row_url}, b"", COST_MS["write"])
        select = self._select(entity, req)
        formatter = RowFormatter(entity, select, Annotations(prefs.annotations), self.lookup_name)
        body = {
            "@odata.context": self._entity_context(entity, select, req),
            **formatter.format(row),
        }
        headers = {
            "ETag": etag(row["versionnumber"]),
            "Preference-Applied": "return=representation",
        }
        cost = COST_MS["write"] + COST_MS["retrieve"]
        return json_response(201 if created else 200, body, cost, headers)

    def _select(self, entity: Entity, req: ApiRequest) -> list[str] | None:
        raw = QueryOptions.parse(req.query).get("$select")
        if raw is None or raw.strip() in ("", "*"):
            return None
        return parse_select(raw, entity_resolver(entity), entity.type_name)

    def _entity_context(self, entity: Entity, select: list[str] | None, req: ApiRequest) -> str:
        cols = f"({','.join(select)})" if select else ""
        return f"{self.api_base(req.version)}$metadata#{entity.entity_set}{cols}/$entity"

    def _bulk(self, entity: Entity, action: str, req: ApiRequest) -> ApiResponse:
        body = _parse_json(req.body, entity.entity_set)
        targets = body.get("Targets") if isinstance(body, dict) else None
        if not isinstance(targets, list) or not targets:
            raise bad_request(f"The parameter 'Targets' of the action '{action}' is required.")
        expected = f"{NS}.{entity.logical_name}"
        for target in targets:
            kind = target.get("@odata.type", "") if isinstance(target, dict) else ""
            if kind.lstrip("#") != expected:
                raise bad_request(
                    f"Each target of '{action}' must be an object with "
                    f'"@odata.type": "{expected}".',
                    errors.PAYLOAD,
                )
        caller = self._caller(req)
        cost = COST_MS["bulk"] + COST_MS["bulk_row"] * len(targets)
        self._spend(req, len(targets))
        base = self.api_base(req.version)
        with self.store.transaction() as conn:
            if action == "CreateMultiple":
                items = [self.writer.prepare(entity, t, creating=True) for t in targets]
                rows = self.writer.create(conn, entity, items, caller)
                ids = [row[entity.primary_id] for row in rows]
            elif action == "UpdateMultiple":
                for target in targets:
                    key = self._target_key(entity, target, action)
                    existing = self._fetch_key(entity, key)
                    if existing is None:
                        raise self._missing(entity, key)
                    values = self.writer.prepare(entity, target, creating=False)
                    self.writer.update(conn, entity, existing, values, caller)
                return ApiResponse(204, {}, b"", cost)
            else:
                ids = []
                for target in targets:
                    key = self._target_key(entity, target, action)
                    existing = self._fetch_key(entity, key)
                    row = self._upsert(conn, entity, key, existing, target, caller, {})
                    ids.append(row[entity.primary_id])
        body = {"@odata.context": f"{base}$metadata#{NS}.{action}Response", "Ids": ids}
        return json_response(200, body, cost)

    def _target_key(self, entity: Entity, target: dict[str, Any], action: str) -> tuple[str, str]:
        """Which row a bulk target names: its primary key, `@odata.id`, or the alternate key."""
        row_id = target.get(entity.primary_id)
        if isinstance(row_id, str):
            return "id", row_id.lower()
        reference = target.get("@odata.id")
        if isinstance(reference, str):
            match = re.search(rf"{entity.entity_set}\((.*)\)$", reference)
            if match is None:
                raise bad_request(
                    f"The @odata.id '{reference}' does not name a {entity.logical_name}."
                )
            return self._resolve_key(entity, match.group(1))
        email = target.get("emailaddress1")
        if isinstance(email, str) and self.settings.current.alternate_key.get(entity.entity_set):
            return "email", email
        raise bad_request(
            f"Each target of '{action}' must carry '{entity.primary_id}' or an alternate key."
        )

    def _upsert(
        self,
        conn: Any,
        entity: Entity,
        key: tuple[str, str],
        existing: dict[str, Any] | None,
        body: Any,
        caller: Caller,
        bindings: dict[str, str],
    ) -> dict[str, Any]:
        """Update the row the key names, or create it (the key's values go into the new row)."""
        if existing is not None:
            values = self.writer.prepare(entity, body, creating=False, bindings=bindings)
            if key[0] == "email":
                # An upsert by alternate key never changes the key.
                values.pop("emailaddress1", None)
            return self.writer.update(conn, entity, existing, values, caller)
        values = self.writer.prepare(entity, body, creating=True, bindings=bindings)
        if key[0] == "id":
            values[entity.primary_id] = key[1]
        elif "emailaddress1" not in values:
            column = entity.columns["emailaddress1"]
            values["emailaddress1"] = self.writer.convert(entity, column, key[1])
        (row,) = self.writer.create(conn, entity, [values], caller)
        return row

    # -- single rows -------------------------------------------------------------------------

    def _resolve_key(self, entity: Entity, key_text: str) -> tuple[str, str]:
        """("id", guid) or ("email", value) for the text inside `leads(...)`."""
        key = parse_key(key_text)
        if isinstance(key, str):
            return "id", key
        if set(key) == {entity.primary_id} and isinstance(key[entity.primary_id], str):
            return "id", key[entity.primary_id].lower()
        if set(key) == {"emailaddress1"} and self.settings.current.alternate_key.get(
            entity.entity_set
        ):
            value = key["emailaddress1"]
            if isinstance(value, str):
                return "email", value
        raise bad_request(
            f"The key in the request URI is not valid for resource '{entity.type_name}'. Ensure "
            "that the names and number of key properties match the declared or alternate key "
            f"properties for the resource '{entity.type_name}'."
        )

    def _fetch_key(self, entity: Entity, key: tuple[str, str]) -> dict[str, Any] | None:
        if key[0] == "id":
            return self.store.fetch(entity, key[1])
        row_id = self.store.find_by_email(entity, key[1])
        return self.store.fetch(entity, row_id) if row_id else None

    def _find(self, entity: Entity, key_text: str) -> tuple[tuple[str, str], dict[str, Any] | None]:
        key = self._resolve_key(entity, key_text)
        return key, self._fetch_key(entity, key)

    @staticmethod
    def _missing(entity: Entity, key: tuple[str, str]) -> DataverseError:
        if key[0] == "id":
            return not_found(entity.logical_name, key[1])
        return DataverseError(
            404,
            errors.OBJECT_DOES_NOT_EXIST,
            f"A record with the specified key values does not exist in {entity.logical_name} entity",
        )

    def _row(self, entity: Entity, key_text: str, rest: list[str], req: ApiRequest) -> ApiResponse:
        prefs = Prefs.parse(req.headers.get("prefer"))
        if not rest:
            self._require(req, "GET", "PATCH", "DELETE")
            if req.method == "GET":
                self._authorize(entity, req, "Read")
                return self._retrieve(entity, key_text, req, prefs)
            if req.method == "PATCH":
                return self._patch(entity, key_text, req, prefs)
            self._authorize(entity, req, "Delete")
            return self._delete(entity, key_text, req)
        if len(rest) == 1 and rest[0] == f"{NS}.QualifyLead" and entity.logical_name == "lead":
            if req.method != "POST":
                raise no_resource(f"{self.api_base(req.version)}{req.path}")
            self._authorize(entity, req, "Read", "Write")
            return self._qualify(entity, key_text, req)
        if len(rest) == 1 and entity.by_json_name(rest[0]) is not None:
            self._authorize(entity, req, "Read" if req.method == "GET" else "Write")
            return self._property(entity, key_text, rest[0], req)
        if len(rest) == 2 and rest[1] == "$ref" and self.writer.navigation(entity, rest[0]):
            self._require(req, "PUT", "DELETE")
            self._authorize(entity, req, "Write")
            return self._reference(entity, key_text, rest[0], req)
        raise segment_not_found(rest[0])

    def _retrieve(
        self, entity: Entity, key_text: str, req: ApiRequest, prefs: Prefs
    ) -> ApiResponse:
        query = QueryOptions.parse(req.query)
        if query.get("$expand") is not None:
            raise bad_request("The sandbox does not support $expand.", errors.INVALID_ARGUMENT)
        select = self._select(entity, req)
        key, row = self._find(entity, key_text)
        if row is None:
            raise self._missing(entity, key)
        tag = etag(row["versionnumber"])
        cached = req.headers.get("if-none-match")
        if (
            cached
            and cached != "null"
            and not prefs.annotations
            and _etag_matches(cached, row["versionnumber"])
        ):
            return ApiResponse(304, {"ETag": tag}, b"", COST_MS["retrieve"])
        formatter = RowFormatter(entity, select, Annotations(prefs.annotations), self.lookup_name)
        body = {
            "@odata.context": self._entity_context(entity, select, req),
            **formatter.format(row),
        }
        headers = {"ETag": tag}
        if prefs.annotations:
            headers["Preference-Applied"] = f'odata.include-annotations="{prefs.annotations}"'
        return json_response(200, body, COST_MS["retrieve"], headers)

    def _patch(self, entity: Entity, key_text: str, req: ApiRequest, prefs: Prefs) -> ApiResponse:
        body = _parse_json(req.body, entity.entity_set)
        if_match = req.headers.get("if-match")
        if_none_match = req.headers.get("if-none-match")
        caller = self._caller(req)
        self._spend(req, 1)
        with self.store.transaction() as conn:
            key, existing = self._find(entity, key_text)
            if if_match:
                if existing is None:
                    raise self._missing(entity, key)
                if if_match.strip() != "*" and not _etag_matches(
                    if_match, existing["versionnumber"]
                ):
                    raise version_mismatch()
            if if_none_match and if_none_match.strip() == "*" and existing is not None:
                raise errors.duplicate_key()
            self._authorize(entity, req, "Create" if existing is None else "Write")
            row = self._upsert(conn, entity, key, existing, body, caller, req.bindings)
        return self._written(entity, row, req, prefs, created=existing is None)

    def _delete(self, entity: Entity, key_text: str, req: ApiRequest) -> ApiResponse:
        if_match = req.headers.get("if-match")
        self._spend(req, 1)
        with self.store.transaction() as conn:
            key, existing = self._find(entity, key_text)
            if existing is None:
                raise self._missing(entity, key)
            if (
                if_match
                and if_match.strip() != "*"
                and not _etag_matches(if_match, existing["versionnumber"])
            ):
                raise version_mismatch()
            self.writer.delete(conn, entity, existing[entity.primary_id], self._caller(req))
        return ApiResponse(204, {}, b"", COST_MS["write"])

    def _reference(
        self, entity: Entity, key_text: str, navigation: str, req: ApiRequest
    ) -> ApiResponse:
        """`PUT <row>/<navigation property>/$ref` with `{"@odata.id": "<url>"}` sets a lookup,
        `DELETE <row>/<navigation property>/$ref` clears it (as `@odata.bind` does in a PATCH)."""
        if req.method == "PUT":
            payload = _parse_json(req.body, entity.entity_set)
            reference = payload.get("@odata.id") if isinstance(payload, dict) else None
            if not isinstance(reference, str):
                raise bad_request(
                    "The request body must be a JSON object with an '@odata.id' property.",
                    errors.PAYLOAD,
                )
        else:
            reference = None
        self._spend(req, 1)
        with self.store.transaction() as conn:
            key, existing = self._find(entity, key_text)
            if existing is None:
                raise self._missing(entity, key)
            values = self.writer.prepare(
                entity, {f"{navigation}@odata.bind": reference}, creating=False,
                bindings=req.bindings,
            )  # fmt: skip
            self.writer.update(conn, entity, existing, values, self._caller(req))
        return ApiResponse(204, {}, b"", COST_MS["write"])

    def _close_opportunity(self, action: str, req: ApiRequest) -> ApiResponse:
        """`POST /WinOpportunity` and `POST /LoseOpportunity` (unbound actions, no return value:
        204)."""
        params = _parse_json(req.body, "opportunities")
        self._authorize(ENTITIES["opportunities"], req, "Write")
        self._spend(req, 1)
        with self.store.transaction() as conn:
            self.writer.close_opportunity(conn, action, params, self._caller(req), req.bindings)
        return ApiResponse(204, {}, b"", COST_MS["write"])

    def _property(self, entity: Entity, key_text: str, name: str, req: ApiRequest) -> ApiResponse:
        self._require(req, "GET", "PUT", "DELETE")
        column = entity.by_json_name(name)
        assert column is not None
        if req.method == "GET":
            key, row = self._find(entity, key_text)
            if row is None:
                raise self._missing(entity, key)
            value = RowFormatter(entity, [name]).format(row)[name]
            if value is None:
                return ApiResponse(204, {}, b"", COST_MS["retrieve"])
            row_id = row[entity.primary_id]
            context = f"{self.api_base(req.version)}$metadata#{entity.entity_set}({row_id})/{name}"
            return json_response(
                200, {"@odata.context": context, "value": value}, COST_MS["retrieve"]
            )
        if req.method == "PUT":
            payload = _parse_json(req.body, entity.entity_set)
            if not isinstance(payload, dict) or "value" not in payload:
                raise bad_request("The request body must be a JSON object with a 'value' property.")
            new_value = payload["value"]
        else:
            new_value = None
        if column.kind == "lookup" or name != column.name:
            raise bad_request(
                f"The property '{name}' cannot be set this way.", errors.INVALID_ARGUMENT
            )
        self._spend(req, 1)
        with self.store.transaction() as conn:
            key, existing = self._find(entity, key_text)
            if existing is None:
                raise self._missing(entity, key)
            values = self.writer.prepare(entity, {name: new_value}, creating=False)
            self.writer.update(conn, entity, existing, values, self._caller(req))
        return ApiResponse(204, {}, b"", COST_MS["write"])

    def _qualify(self, entity: Entity, key_text: str, req: ApiRequest) -> ApiResponse:
        params = _parse_json(req.body, entity.entity_set)
        flags = qualify_flags(params)
        for flag, entity_set in QUALIFY_CREATES.items():
            if flags[flag]:
                self._authorize(ENTITIES[entity_set], req, "Create")
        # The lead's update plus each record created.
        self._spend(req, 1 + sum(flags.values()))
        with self.store.transaction() as conn:
            key, lead = self._find(entity, key_text)
            if lead is None:
                raise self._missing(entity, key)
            created = self.writer.qualify(conn, lead, params, self._caller(req))
        base = self.api_base(req.version)
        value = [
            {"@odata.type": f"#{NS}.{e.logical_name}", e.primary_id: row_id}
            for e, row_id in created
        ]
        body = {"@odata.context": f"{base}$metadata#Collection({NS}.crmbaseentity)", "value": value}
        return json_response(200, body, COST_MS["qualify"])

    # -- $batch ------------------------------------------------------------------------------

    def _batch(self, req: ApiRequest) -> ApiResponse:
        prefs = Prefs.parse(req.headers.get("prefer"))
        items = parse_batch(req.headers.get("content-type"), req.body)
        answers: list[PartResponse | ChangeSetResponse] = []
        cost = COST_MS["batch"]
        for item in items:
            if isinstance(item, ChangeSet):
                answer, spent = self._changeset(item, req)
            else:
                answer, spent = self._part(item, req, {})
            cost += spent
            failed = isinstance(answer, PartResponse) and answer.status >= 400
            if failed and not prefs.continue_on_error:
                # The whole batch answers with the failure, whose part is the only one returned.
                content_type, body = render_batch([answer])
                return ApiResponse(answer.status, {"Content-Type": content_type}, body, cost)
            answers.append(answer)
        content_type, body = render_batch(answers)
        return ApiResponse(200, {"Content-Type": content_type}, body, cost)

    def _changeset(
        self, changeset: ChangeSet, req: ApiRequest
    ) -> tuple[PartResponse | ChangeSetResponse, float]:
        bindings: dict[str, str] = {}
        parts: list[PartResponse] = []
        cost = 0.0
        # The change set's records are paid for before its transaction starts, so that no write
        # lock is held while the server "works".
        self._spend(req, sum(_records_written(inner) for inner in changeset.requests))
        try:
            with self.store.transaction():
                for inner in changeset.requests:
                    if inner.method == "GET":
                        failure = PartResponse(
                            400,
                            {"Content-Type": JSON_TYPE, "OData-Version": "4.0"},
                            dumps(
                                bad_request(
                                    "An invalid HTTP method 'GET' was detected for a request in a "
                                    "change set. Requests in change sets only support the HTTP "
                                    "methods 'POST', 'PUT', 'DELETE', and 'PATCH'."
                                ).body()
                            ),
                            inner.content_id,
                        )
                        raise _ChangeSetFailed(failure)
                    part, spent = self._part(inner, req, bindings, prepaid=True)
                    cost += spent
                    if part.status >= 400:
                        raise _ChangeSetFailed(part)
                    location = part.headers.get("OData-EntityId")
                    if inner.content_id and location:
                        bindings[f"${inner.content_id}"] = location
                    parts.append(part)
        except _ChangeSetFailed as failed:
            return failed.part, cost
        return ChangeSetResponse(parts), cost

    def _part(
        self,
        inner: BatchRequest,
        req: ApiRequest,
        bindings: dict[str, str],
        *,
        prepaid: bool = False,
    ) -> tuple[PartResponse, float]:
        try:
            path, query, version = self._inner_target(inner.url, req.version, bindings)
        except DataverseError as exc:
            answer = error_response(exc)
        else:
            headers = {k: v for k, v in req.headers.items() if k in _INHERITED}
            headers.update(inner.headers)
            if split_path(path)[:1] == ["$batch"]:
                answer = error_response(bad_request("A batch cannot contain another batch."))
            else:
                answer = self.handle(
                    ApiRequest(
                        inner.method, path, query, headers, inner.body, version, req.user_id,
                        bindings, req.budget, prepaid,
                    )
                )  # fmt: skip
        headers = {"OData-Version": "4.0", **answer.headers}
        if answer.status in (200, 201) and headers.get("Content-Type", "").startswith(
            "application/json"
        ):
            headers["Content-Type"] = f"{JSON_TYPE}; odata.streaming=true"
        if "OData-EntityId" in headers and inner.method in ("POST", "PATCH"):
            headers["Location"] = headers["OData-EntityId"]
        return PartResponse(answer.status, headers, answer.body, inner.content_id), answer.cost_ms

    def _inner_target(
        self, url: str, version: str, bindings: dict[str, str]
    ) -> tuple[str, str, str]:
        if len(url) > MAX_BATCH_URL:
            raise url_too_long(len(url), MAX_BATCH_URL)
        if url.startswith("$"):
            reference, _, tail = url.partition("/")
            if reference not in bindings:
                raise bad_request(
                    f"Content-ID Reference: '{reference}' does not exist in the batch context."
                )
            url = bindings[reference] + (f"/{tail}" if tail else "")
        parts = urlsplit(url)
        path = parts.path
        match = re.match(r"/?api/data/(v\d+\.\d+)/?(.*)", path.lstrip("/"))
        if match is not None:
            return match.group(2), parts.query, match.group(1)
        return path.lstrip("/"), parts.query, version


def _records_written(inner: BatchRequest) -> int:
    """How many records a `$batch` part writes, for the cost model: none for a GET, each target
    of a bulk action, the lead and what QualifyLead creates, otherwise one."""
    if inner.method == "GET":
        return 0
    path = inner.url.split("?")[0]
    try:
        body = json.loads(inner.body or b"{}")
    except ValueError:
        body = None
    if any(path.endswith(f"{NS}.{action}") for action in BULK_ACTIONS):
        targets = body.get("Targets") if isinstance(body, dict) else None
        return len(targets) if isinstance(targets, list) else 1
    if path.endswith(f"{NS}.QualifyLead") and isinstance(body, dict):
        return 1 + sum(body.get(flag) is True for flag in QUALIFY_CREATES)
    return 1


class _ChangeSetFailed(Exception):
    """Raised inside a change set's transaction to roll it back, carrying the failed answer."""

    def __init__(self, part: PartResponse) -> None:
        super().__init__(part.status)
        self.part = part
