"""Writes: payload validation (types, MaxLength in UTF-16 code units, value ranges, state/status),
server-set columns, the alternate key and duplicate rule on `emailaddress1`, deletes with their
relationships' cascades, lead qualification into an account, a contact and an opportunity, and
closing an opportunity as won or lost (§2.5-§2.8, §7)."""

from __future__ import annotations

import calendar
import datetime as dt
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sandbox.dataverse import errors
from sandbox.dataverse.errors import DataverseError, bad_request, duplicate_key, not_found
from sandbox.dataverse.schema import BY_LOGICAL_NAME, ENTITIES, NS, RELATIONSHIPS, Column, Entity
from sandbox.dataverse.settings import SettingsHolder
from sandbox.dataverse.store import Store, casefold

_GUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_BIND = re.compile(r"(?:.*/)?([A-Za-z_]\w*)\(([0-9a-fA-F-]{36})\)$")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_INT_KINDS = {"int", "bigint", "picklist", "state", "status"}
_INT32 = (-(2**31), 2**31 - 1)
# The state an opportunity is closed into by each action, and the wording the platform uses for
# it in CannotUseOpportunitySetStateMessage (lowercase, as seen live; see `_check_state`).
CLOSE_ACTIONS = {"WinOpportunity": 1, "LoseOpportunity": 2}
_CLOSED_LABELS = {1: "won", 2: "lost"}
# What an OpportunityClose (the activity a close records) may carry here; the emulator does not
# keep the activity itself (UNCONFIRMED which other columns the real one accepts: all of the
# opportunityclose table's writable ones).
_OPPORTUNITY_CLOSE_FIELDS = (
    "@odata.type", "opportunityid@odata.bind", "subject", "description", "actualrevenue",
    "actualend",
)  # fmt: skip
_ADDRESS_PARTS = (
    "address1_line1", "address1_line2", "address1_line3", "address1_city",
    "address1_stateorprovince", "address1_postalcode", "address1_country",
)  # fmt: skip
# Columns QualifyLead copies from the lead to the new contact.
QUALIFY_COPY = (
    "firstname", "middlename", "lastname", "salutation", "emailaddress1", "emailaddress2",
    "emailaddress3", "telephone1", "telephone2", "telephone3", "mobilephone", "fax", "jobtitle",
    "websiteurl", "description", "address1_name", "address1_line1", "address1_line2",
    "address1_line3", "address1_city", "address1_stateorprovince", "address1_county",
    "address1_postalcode", "address1_postofficebox", "address1_country", "address1_telephone1",
    "address1_telephone2", "address1_telephone3", "address1_fax", "donotemail", "donotbulkemail",
    "donotphone", "donotpostalmail",
)  # fmt: skip
_BOOL_DEFAULTS = ("donotemail", "donotbulkemail", "donotphone", "donotpostalmail")
# Columns QualifyLead copies from the lead to the new account (lead column -> account column).
QUALIFY_ACCOUNT = {
    "companyname": "name", "emailaddress1": "emailaddress1", "telephone1": "telephone1",
    "websiteurl": "websiteurl",
}  # fmt: skip


def utf16_length(text: str) -> int:
    """The length .NET (and so Dataverse's MaxLength) counts: UTF-16 code units, so a character
    outside the Basic Multilingual Plane, such as an emoji, counts 2."""
    return len(text.encode("utf-16-le")) // 2


def clip(text: str | None, units: int) -> str | None:
    """`text` cut to at most `units` UTF-16 code units, never inside a surrogate pair; None for
    nothing left."""
    if not text:
        return None
    if utf16_length(text) <= units:
        return text
    data = text.encode("utf-16-le")[: units * 2]
    if len(data) >= 2 and 0xD800 <= int.from_bytes(data[-2:], "little") <= 0xDBFF:
        data = data[:-2]
    return data.decode("utf-16-le") or None


@dataclass(frozen=True)
class Caller:
    """Who writes, and the per-request switches that change how writes are checked."""

    user_id: str
    detect_duplicates: bool = False


def invalid_property(name: str, entity: Entity) -> DataverseError:
    """400 for a body property the table does not have (names are case-sensitive)."""
    return bad_request(
        "An error occurred while validating input parameters: Microsoft.Crm.CrmException: "
        f"Invalid property '{name}' was found in entity '{entity.type_name}'."
    )


def _cannot_convert(value: Any, edm: str) -> DataverseError:
    return bad_request(f"Cannot convert the literal '{value}' to the expected type '{edm}'.")


class Writer:
    """Applies validated writes to the store."""

    def __init__(self, store: Store, settings: SettingsHolder, user_names: dict[str, str]) -> None:
        self.store = store
        self.settings = settings
        self.user_names = user_names

    # -- payload -----------------------------------------------------------------------------

    def prepare(
        self, entity: Entity, body: Any, *, creating: bool, bindings: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """The stored values a JSON body asks for. Read-only columns (and, on update, create-only
        ones) are silently dropped, as the service does."""
        if not isinstance(body, dict):
            raise bad_request(
                f"Error identified in Payload provided by the user for Entity :'{entity.entity_set}'"
                ": the request body must be a JSON object.",
                errors.PAYLOAD,
            )
        values: dict[str, Any] = {}
        for key, value in body.items():
            if key.endswith("@odata.bind"):
                column, target = self._bind_column(entity, key[: -len("@odata.bind")])
                if not (creating or column.valid_for_update):
                    continue
                if value is None:
                    # `"parentcustomerid_account@odata.bind": null` disassociates (documented in
                    # "Associate and disassociate table rows using the Web API").
                    values[column.name] = self.convert(entity, column, None)
                else:
                    values[column.name] = self._bind_target(column, target, value, bindings or {})
                continue
            if "@" in key:
                continue
            column = entity.columns.get(key)
            if column is None or column.kind == "lookup":
                raise invalid_property(key, entity)
            if column.read_only or not (
                column.valid_for_create if creating else column.valid_for_update
            ):
                continue
            values[column.name] = self.convert(entity, column, value)
        return values

    def navigation(self, entity: Entity, name: str) -> bool:
        """Whether `name` is a single-valued navigation property of the table that a client may
        write (`parentcustomerid_account`, `primarycontactid`)."""
        try:
            self._bind_column(entity, name)
        except DataverseError:
            return False
        return True

    def _bind_column(self, entity: Entity, name: str) -> tuple[Column, str]:
        """The lookup a navigation property writes, and the table it points at. A customer lookup
        has one navigation property per target (`parentcustomerid_account`), not its own name."""
        column = entity.columns.get(name)
        target = column.target if column is not None and not column.targets else None
        if column is None and "_" in name:
            base, _, suffix = name.rpartition("_")
            candidate = entity.columns.get(base)
            if candidate is not None and suffix in candidate.targets:
                column, target = candidate, suffix
        if column is None or column.kind != "lookup" or column.read_only or target is None:
            raise bad_request(
                "Error identified in Payload provided by the user for Entity :"
                f"'{entity.entity_set}', For more information on this error please follow this "
                "help link https://go.microsoft.com/fwlink/?linkid=2195293  ---->  "
                "InnerException : Microsoft.OData.ODataException: An undeclared property "
                f"'{name}' which only has property annotations in the payload but no property "
                "value was found in the payload. In OData, only declared navigation properties "
                "and declared named streams can be represented as properties without values.",
                errors.PAYLOAD,
            )
        return column, target

    def _bind_target(
        self, column: Column, target_name: str, value: Any, bindings: dict[str, str]
    ) -> str:
        if isinstance(value, str) and value in bindings:
            value = bindings[value]
        match = _BIND.match(value) if isinstance(value, str) else None
        target = BY_LOGICAL_NAME.get(target_name)
        expected = target.entity_set if target else f"{target_name}s"
        if match is None or match.group(1) != expected:
            raise bad_request(
                f"The value '{value}' of '{column.name}@odata.bind' is not a valid reference to "
                f"a {target_name} record.",
                errors.PAYLOAD,
            )
        row_id = match.group(2).lower()
        exists = (
            self.store.fetch(target, row_id) is not None
            if target is not None
            else row_id in self.user_names
        )
        if not exists:
            raise not_found(target_name, row_id)
        return row_id

    def convert(self, entity: Entity, column: Column, value: Any) -> Any:
        """One JSON value checked against the column's type and limits, in stored form."""
        if value is None:
            if column.required == "SystemRequired":
                raise bad_request(
                    f"The '{column.name}' attribute of the '{entity.logical_name}' entity is "
                    "required and cannot be set to null.",
                    errors.INVALID_ARGUMENT,
                )
            return None
        if column.kind in ("string", "memo"):
            if not isinstance(value, str):
                raise _cannot_convert(value, "Edm.String")
            if value == "":
                # Dataverse stores empty strings as null.
                return None
            if column.max_length is not None and utf16_length(value) > column.max_length:
                raise bad_request(
                    f"A validation error occurred.  The length of the '{column.name}' attribute "
                    f"of the '{entity.logical_name}' entity exceeded the maximum allowed length of "
                    f"'{column.max_length}'.",
                    errors.MAX_LENGTH,
                )
            return value
        if column.kind == "uuid":
            if not isinstance(value, str) or not _GUID.fullmatch(value):
                raise _cannot_convert(value, "Edm.Guid")
            return value.lower()
        if column.kind == "money":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _cannot_convert(value, "Edm.Decimal")
            _check_range(entity, column, value)
            return float(value)
        if column.kind == "date":
            if not isinstance(value, str) or not _DATE.fullmatch(value):
                raise _cannot_convert(value, "Edm.Date")
            try:
                return date_epoch(value)
            except ValueError:
                raise _cannot_convert(value, "Edm.Date") from None
        if column.kind == "bool":
            if not isinstance(value, bool):
                raise _cannot_convert(value, "Edm.Boolean")
            return int(value)
        if column.kind in _INT_KINDS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _cannot_convert(value, column.edm_type)
            if column.edm_type == "Edm.Int32" and not _INT32[0] <= value <= _INT32[1]:
                raise _cannot_convert(value, column.edm_type)
            if column.kind == "int":
                _check_range(entity, column, value)
            if column.kind == "picklist" and value not in column.options:
                raise bad_request(
                    f"A validation error occurred. The value {value} of '{column.name}' on record "
                    f"of type '{entity.logical_name}' is outside the valid range. Accepted Values: "
                    f"{','.join(str(k) for k in column.options)}",
                    errors.INVALID_ARGUMENT,
                )
            return value
        raise _cannot_convert(value, column.edm_type)

    # -- rules -------------------------------------------------------------------------------

    def _check_required(self, entity: Entity, row: dict[str, Any], names: list[str]) -> None:
        if not self.settings.current.strict:
            return
        for name in names:
            column = entity.columns[name]
            if column.required == "ApplicationRequired" and row.get(name) is None:
                raise bad_request(
                    f"A validation error occurred. The '{name}' attribute of the "
                    f"'{entity.logical_name}' entity is required (strict mode).",
                    errors.INVALID_ARGUMENT,
                )

    def _check_email_rules(
        self,
        entity: Entity,
        email: str | None,
        caller: Caller,
        row_id: str,
        pending: set[object] | None = None,
    ) -> None:
        if email is None:
            return
        settings = self.settings.current
        folded = casefold(email)
        clash = (pending is not None and folded in pending) or (
            self.store.find_by_email(entity, email, exclude_id=row_id) is not None
        )
        if not clash:
            return
        # The duplicate rule runs before the row is saved; the key's unique index at save time.
        if caller.detect_duplicates and settings.duplicate_detection.get(entity.entity_set):
            raise DataverseError(
                500,
                errors.DUPLICATE_DETECTED,
                "A record was not created or updated because a duplicate of the current record "
                "already exists.",
            )
        if settings.alternate_key.get(entity.entity_set):
            raise duplicate_key()

    def _check_state(
        self, entity: Entity, values: dict[str, Any], current_state: int | None
    ) -> tuple[int, int]:
        creating = current_state is None
        state = 0 if creating else values.get("statecode", current_state)
        if state not in entity.states:
            raise self._state_error()
        if not creating and entity.logical_name == "lead" and state == 1 and current_state != 1:
            raise bad_request(
                "A lead is qualified with the QualifyLead action, not by setting statecode.",
                errors.INVALID_ARGUMENT,
            )
        if (
            not creating
            and entity.logical_name == "opportunity"
            and state in _CLOSED_LABELS
            and state != current_state
        ):
            # Won and Lost are reached with the WinOpportunity / LoseOpportunity actions only.
            # Name, code and template: CannotUseOpportunitySetStateMessage in the Web service
            # error codes list (powerapps-docs); the filled-in wording ("won", "the won message")
            # is what a third-party migration tool reports seeing live. Status 400 UNCONFIRMED.
            label = _CLOSED_LABELS[state]
            raise bad_request(
                f"This message can not be used to set the state of opportunity to {label}. In "
                f"order to set state of opportunity to {label}, use the {label} message instead.",
                errors.OPPORTUNITY_SET_STATE,
            )
        status = values.get("statuscode")
        if status is None:
            return state, entity.states[state][0]
        if status not in entity.states[state]:
            raise self._state_error()
        return state, status

    @staticmethod
    def _state_error() -> DataverseError:
        return bad_request(
            "State code is invalid or state code is valid but status code is invalid for a "
            "specified state code.",
            errors.INVALID_STATE_STATUS,
        )

    @staticmethod
    def computed(row: dict[str, Any], entity: Entity | None = None) -> None:
        """Set the columns the server derives (of those `entity` has): fullname ("First Last")
        and the composite address, cut to their MaxLength in UTF-16 code units."""
        columns = entity.columns if entity is not None else None
        if columns is None or "fullname" in columns:
            full = " ".join(p for p in (row.get("firstname"), row.get("lastname")) if p).strip()
            row["fullname"] = clip(full, 160)
        if columns is None or "address1_composite" in columns:
            parts = [row.get(name) for name in _ADDRESS_PARTS]
            row["address1_composite"] = clip("\n".join(p for p in parts if p), 1000)

    # -- operations --------------------------------------------------------------------------

    def create(
        self, conn: sqlite3.Connection, entity: Entity, items: list[dict[str, Any]], caller: Caller
    ) -> list[dict[str, Any]]:
        """Create rows (all or none) inside the caller's transaction; returns the full rows."""
        now = int(time.time())
        first_version = self.store.next_versions(conn, len(items))
        rows: list[dict[str, Any]] = []
        seen_ids: set[str] = set()
        seen_emails: set[object] = set()
        for offset, values in enumerate(items):
            row = dict.fromkeys(entity.columns)
            row.update(values)
            row_id = values.get(entity.primary_id) or str(uuid.uuid4())
            if row_id in seen_ids or self.store.fetch(entity, row_id) is not None:
                raise duplicate_key()
            seen_ids.add(row_id)
            self._check_required(entity, row, list(entity.columns))
            state, status = self._check_state(entity, values, None)
            self._check_email_rules(entity, row.get("emailaddress1"), caller, row_id, seen_emails)
            if row.get("emailaddress1") is not None:
                seen_emails.add(casefold(row["emailaddress1"]))
            for name in _BOOL_DEFAULTS:
                if name in entity.columns and row.get(name) is None:
                    row[name] = 0
            row.update(
                {
                    entity.primary_id: row_id,
                    "statecode": state,
                    "statuscode": status,
                    "ownerid": values.get("ownerid") or caller.user_id,
                    "createdby": caller.user_id,
                    "modifiedby": caller.user_id,
                    "createdon": now,
                    "modifiedon": now,
                    "versionnumber": first_version + offset,
                }
            )
            self.computed(row, entity)
            rows.append(row)
        self.store.insert(conn, entity, rows)
        return rows

    def update(
        self,
        conn: sqlite3.Connection,
        entity: Entity,
        existing: dict[str, Any],
        values: dict[str, Any],
        caller: Caller,
    ) -> dict[str, Any]:
        """Update one existing row inside the caller's transaction; returns the new full row."""
        row = {**existing, **values}
        row_id = existing[entity.primary_id]
        self._check_required(entity, row, list(values))
        state, status = self._check_state(entity, values, existing["statecode"])
        email = values.get("emailaddress1")
        if "emailaddress1" in values and casefold(email) != casefold(existing.get("emailaddress1")):
            self._check_email_rules(entity, email, caller, row_id)
        row.update(
            {
                "statecode": state,
                "statuscode": status,
                "modifiedby": caller.user_id,
                "modifiedon": int(time.time()),
                "versionnumber": self.store.next_versions(conn),
            }
        )
        self.computed(row, entity)
        changed = {k: v for k, v in row.items() if k != entity.primary_id}
        self.store.update(conn, entity, row_id, changed)
        return row

    def delete(
        self,
        conn: sqlite3.Connection,
        entity: Entity,
        row_id: str,
        caller: Caller,
        done: set[tuple[str, str]] | None = None,
    ) -> None:
        """Delete one row inside the caller's transaction and apply the delete behaviour of every
        relationship pointing at it (schema.RELATIONSHIPS): Cascade deletes the referencing rows
        (and what points at them, recursively), RemoveLink clears their lookup (an update: new
        `versionnumber`, `modifiedon`, `modifiedby`, so delta links report it). Each deletion
        leaves a tombstone, so the cascaded rows show up as `$deletedEntity` too.

        A customer lookup stores only the id, so a referencing row is found by id whatever table
        the lookup points at (GUIDs do not repeat across tables)."""
        done = set() if done is None else done
        key = (entity.entity_set, row_id)
        if key in done:
            return
        done.add(key)
        if not self.store.delete(conn, entity, row_id):
            return
        relationships = [r for r in RELATIONSHIPS if r.referenced == entity.logical_name]
        # Cascades first, so that no row is updated just before it is deleted.
        for relationship in sorted(relationships, key=lambda r: r.delete != "Cascade"):
            child = ENTITIES[relationship.entity_set]
            ids = [
                found
                for (found,) in conn.execute(
                    f"SELECT {child.primary_id} FROM {child.entity_set} "
                    f"WHERE {relationship.column} = ?",
                    (row_id,),
                )
            ]
            for child_id in ids:
                if relationship.delete == "Cascade":
                    self.delete(conn, child, child_id, caller, done)
                else:
                    self.store.update(
                        conn,
                        child,
                        child_id,
                        {
                            relationship.column: None,
                            "modifiedby": caller.user_id,
                            "modifiedon": int(time.time()),
                            "versionnumber": self.store.next_versions(conn),
                        },
                    )

    def close_opportunity(
        self,
        conn: sqlite3.Connection,
        action: str,
        params: Any,
        caller: Caller,
        bindings: dict[str, str] | None = None,
    ) -> str:
        """WinOpportunity / LoseOpportunity: close the opportunity the `OpportunityClose` binds
        to as Won (statecode 1) or Lost (2) with `Status` as its statuscode. Returns its id.

        The parameters are the documented ones (`OpportunityClose`, an opportunityclose entity
        with `opportunityid@odata.bind`, and `Status`). Set on the opportunity: `actualclosedate`
        (`actualend` of the close, else today, UTC), and `actualvalue` (`actualrevenue` of the
        close; when winning without it, the estimated revenue if no actual one is set, as
        opportunity.md describes the field). The opportunityclose activity itself is not kept
        (not emulated)."""
        state = CLOSE_ACTIONS[action]
        opportunities = ENTITIES["opportunities"]
        if not isinstance(params, dict):
            raise bad_request(f"The {action} parameters must be a JSON object.", errors.PAYLOAD)
        for name in ("OpportunityClose", "Status"):
            if name not in params:
                raise bad_request(
                    f"The parameter '{name}' of the action '{action}' is required.",
                    errors.INVALID_ARGUMENT,
                )
        close, status = params["OpportunityClose"], params["Status"]
        if not isinstance(close, dict):
            raise _cannot_convert(close, f"{NS}.opportunityclose")
        for key in close:
            if key not in _OPPORTUNITY_CLOSE_FIELDS:
                raise bad_request(
                    "An error occurred while validating input parameters: "
                    "Microsoft.Crm.CrmException: Invalid property "
                    f"'{key}' was found in entity '{NS}.opportunityclose'."
                )
        if isinstance(status, bool) or not isinstance(status, int):
            raise _cannot_convert(status, "Edm.Int32")
        if status not in opportunities.states[state]:
            raise self._state_error()
        reference = close.get("opportunityid@odata.bind")
        if reference is None:
            raise bad_request(
                f"The OpportunityClose of '{action}' must bind 'opportunityid@odata.bind' to the "
                "opportunity to close.",
                errors.INVALID_ARGUMENT,
            )
        target = Column("opportunityid", "lookup", "Opportunity", target="opportunity")
        opportunity_id = self._bind_target(target, "opportunity", reference, bindings or {})
        row = self.store.fetch(opportunities, opportunity_id)
        if row is None:
            raise not_found("opportunity", opportunity_id)
        subject = close.get("subject")
        if subject is not None:
            if not isinstance(subject, str):
                raise _cannot_convert(subject, "Edm.String")
            if utf16_length(subject) > 200:
                raise bad_request(
                    "A validation error occurred.  The length of the 'subject' attribute of the "
                    "'opportunityclose' entity exceeded the maximum allowed length of '200'.",
                    errors.MAX_LENGTH,
                )
        if row["statecode"] != 0:
            raise DataverseError(
                400, errors.OPPORTUNITY_ALREADY_CLOSED, "The opportunity is already closed."
            )
        revenue = close.get("actualrevenue")
        if revenue is not None:
            actual = self.convert(opportunities, opportunities.columns["actualvalue"], revenue)
        elif state == 1 and row["actualvalue"] is None:
            actual = row["estimatedvalue"]
        else:
            actual = row["actualvalue"]
        end = close.get("actualend")
        if end is None:
            closed_on = date_epoch(time.strftime("%Y-%m-%d", time.gmtime()))
        elif isinstance(end, str) and _DATE.match(end):
            try:
                closed_on = date_epoch(end[:10])
            except ValueError:
                raise _cannot_convert(end, "Edm.DateTimeOffset") from None
        else:
            raise _cannot_convert(end, "Edm.DateTimeOffset")
        self.store.update(
            conn,
            opportunities,
            opportunity_id,
            {
                "statecode": state,
                "statuscode": status,
                "actualvalue": actual,
                "actualclosedate": closed_on,
                "modifiedby": caller.user_id,
                "modifiedon": int(time.time()),
                "versionnumber": self.store.next_versions(conn),
            },
        )
        return opportunity_id

    def qualify(
        self, conn: sqlite3.Connection, lead: dict[str, Any], params: Any, caller: Caller
    ) -> list[tuple[Entity, str]]:
        """QualifyLead: close the lead as qualified and create the account, contact and
        opportunity the flags ask for, each with `originatingleadid` = the lead. The lead then
        points at its account and contact (`parentaccountid`, `parentcontactid`)."""
        flags = qualify_flags(params)
        leads = ENTITIES["leads"]
        status = params["Status"]
        if isinstance(status, bool) or not isinstance(status, int) or status not in leads.states[1]:
            raise self._state_error()
        if lead["statecode"] != 0:
            raise DataverseError(
                400,
                "0x80040233",
                "This lead is already closed. You cannot convert or qualify a lead that is "
                "already closed.",
            )
        lead_id = lead["leadid"]
        as_caller = Caller(caller.user_id)
        created: list[tuple[Entity, str]] = []
        account_id: str | None = lead.get("parentaccountid")
        contact_id: str | None = lead.get("parentcontactid")
        if flags["CreateAccount"]:
            accounts = ENTITIES["accounts"]
            values: dict[str, Any] = {
                target: lead.get(source) for source, target in QUALIFY_ACCOUNT.items()
            }
            values["name"] = clip(values["name"], accounts.columns["name"].max_length or 160)
            values["originatingleadid"] = lead_id
            (account,) = self.create(conn, accounts, [values], as_caller)
            account_id = account["accountid"]
            created.append((accounts, account_id))
        if flags["CreateContact"]:
            # A new contact even when the lead already names one (the flag is obeyed as given;
            # the Sales UI is what clears it for a lead with an existing contact).
            contacts = ENTITIES["contacts"]
            values = {name: lead.get(name) for name in QUALIFY_COPY}
            values["originatingleadid"] = lead_id
            values["company"] = clip(lead.get("companyname"), 50)
            if flags["CreateAccount"]:
                values["parentcustomerid"] = account_id
            (contact,) = self.create(conn, contacts, [values], as_caller)
            contact_id = contact["contactid"]
            created.append((contacts, contact_id))
        if flags["CreateOpportunity"]:
            opportunities = ENTITIES["opportunities"]
            values = {
                "name": clip(lead.get("subject"), 300),
                "parentaccountid": account_id,
                "parentcontactid": contact_id,
                "customerid": account_id or contact_id,
                "originatingleadid": lead_id,
            }
            (opportunity,) = self.create(conn, opportunities, [values], as_caller)
            created.append((opportunities, opportunity["opportunityid"]))
        self.store.update(
            conn,
            leads,
            lead_id,
            {
                "statecode": 1,
                "statuscode": status,
                "parentaccountid": account_id,
                "parentcontactid": contact_id,
                "modifiedby": caller.user_id,
                "modifiedon": int(time.time()),
                "versionnumber": self.store.next_versions(conn),
            },
        )
        return created


def qualify_flags(params: Any) -> dict[str, bool]:
    """The CreateAccount/CreateContact/CreateOpportunity parameters of QualifyLead, checked."""
    if not isinstance(params, dict):
        raise bad_request("The QualifyLead parameters must be a JSON object.", errors.PAYLOAD)
    for name in ("CreateAccount", "CreateContact", "CreateOpportunity", "Status"):
        if name not in params:
            raise bad_request(
                f"The parameter '{name}' of the action 'QualifyLead' is required.",
                errors.INVALID_ARGUMENT,
            )
    flags = {name: params[name] for name in ("CreateAccount", "CreateContact", "CreateOpportunity")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise _cannot_convert(flags, "Edm.Boolean")
    return flags


def date_epoch(text: str) -> int:
    """A `YYYY-MM-DD` date as stored: midnight UTC, epoch seconds (ValueError when invalid)."""
    day = dt.date.fromisoformat(text)
    return calendar.timegm(day.timetuple())


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _check_range(entity: Entity, column: Column, value: float) -> None:
    """Integer and Money columns refuse values outside MinValue..MaxValue. The wording follows
    the picklist range error above; UNCONFIRMED for these column types."""
    low, high = column.min_value, column.max_value
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad_request(
            f"A validation error occurred. The value {_number(value)} of '{column.name}' on "
            f"record of type '{entity.logical_name}' is outside the valid range. Accepted "
            f"Range: {_number(low if low is not None else value)} to "
            f"{_number(high if high is not None else value)}",
            errors.INVALID_ARGUMENT,
        )
