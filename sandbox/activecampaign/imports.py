"""Bulk import: payload validation, the batch queue, and the background worker that applies it."""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import uuid
from collections import defaultdict
from datetime import datetime
from typing import Any

from sandbox.activecampaign import ops
from sandbox.activecampaign.store import ACCOUNT_TZ, ApiError, Store, Tx, now

log = logging.getLogger(__name__)

MAX_CONTACTS = 250
# The up-front check is only `something@something`; addresses that pass it but that AC cannot
# store (e.g. no top-level domain) fail one by one while the batch is processed.
_LOOSE_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_TEXT_KEYS = ("first_name", "last_name", "phone", "customer_acct_name")
_NOT_QUEUED = (
    "JSON payload did not pass validation. Please correct the contacts listed in failureReasons."
    " The import was not queued for processing."
)
RATE_LIMITED = {
    "success": 0,
    "message": "Rate limit exceeded.",
    "failureReasons": [
        "Up to 100 imports may be requested per minute.Please batch contacts into larger"
        " requests, or retry this request in a minute."
    ],
}


def _rejected(reasons: list[Any]) -> ApiError:
    return ApiError(400, {"success": 0, "message": _NOT_QUEUED, "failureReasons": reasons})


def _contact_problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return "Contact must be an object"
    email = item.get("email")
    if not isinstance(email, str) or not email.strip():
        return "Field 'email' is required"
    if not _LOOSE_EMAIL.match(email.strip()):
        return "Field 'email' incorrect format"
    for key in _TEXT_KEYS:
        if key in item and item[key] is not None and not isinstance(item[key], str | int | float):
            return f"Field '{key}' must be a string"
    tags = item.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        return "Field 'tags' must be an array of strings"
    fields = item.get("fields", [])
    if not isinstance(fields, list) or not all(
        isinstance(f, dict) and ops.as_int(f.get("id")) is not None and "value" in f for f in fields
    ):
        return "Field 'fields' must be an array of objects with 'id' and 'value'"
    for key in ("subscribe", "unsubscribe"):
        lists = item.get(key, [])
        if not isinstance(lists, list) or not all(
            isinstance(entry, dict) and ops.as_int(entry.get("listid")) is not None
            for entry in lists
        ):
            return f"Field '{key}' must be an array of objects with 'listid'"
    return None


def validate(body: Any, index_base: int = 0) -> list[dict[str, Any]]:
    """The contacts of a POST /import/bulk_import body, or a 400 saying what is wrong.

    `failureReasons[].contact` is the index of the contact in the request, counted from
    `index_base` (0 by default; AC does not document it).
    """
    contacts = body.get("contacts") if isinstance(body, dict) else None
    if not isinstance(contacts, list):
        raise _rejected(["Field 'contacts' is required and must be an array"])
    if not contacts:
        raise _rejected(["Field 'contacts' must contain at least 1 contact"])
    if len(contacts) > MAX_CONTACTS:
        raise _rejected([f"Up to {MAX_CONTACTS} contacts may be imported per request"])
    reasons = [
        {"contact": index + index_base, "failureReason": problem}
        for index, item in enumerate(contacts)
        if (problem := _contact_problem(item)) is not None
    ]
    if reasons:
        raise _rejected(reasons)
    return contacts


def _text(item: dict[str, Any], key: str) -> str | None:
    return ops.as_text(item[key]).strip() if item.get(key) is not None else None


# How a bulk import treats an empty value (UNCONFIRMED: AC documents neither): `ignore` (the
# default, the stricter reading: an import never clears a stored value, as import tools' "do not
# overwrite with blanks" defaults do) or `clear`.
BLANK_READINGS = ("ignore", "clear")


def import_contacts(
    tx: Tx, contacts: list[dict[str, Any]], blanks: str = BLANK_READINGS[0]
) -> tuple[list[str], list[str]]:
    """Create or update (by email, any case) each contact; (success ids, failed emails).

    Under `blanks="ignore"` an empty name, phone or custom field value leaves the stored one."""
    success: list[str] = []
    failure: list[str] = []
    # One batch is applied at once: its contacts and tag associations share one second.
    at = tx.at = now()
    for item in contacts:
        email = item["email"].strip()
        if not ops.valid_email(email):
            failure.append(email)
            continue

        def given(value: str | None) -> str | None:
            return None if blanks == "ignore" and not value else value

        data = ops.ContactInput(
            email=email,
            first_name=given(_text(item, "first_name")),
            last_name=given(_text(item, "last_name")),
            phone=given(_text(item, "phone")),
            field_values=[
                (int(f["id"]), ops.as_text(f["value"]))
                for f in item.get("fields", [])
                if given(ops.as_text(f["value"]).strip()) is not None
            ],
        )
        contact_id = ops.find_contact_by_email(tx.db, email)
        if contact_id is None:
            contact_id = ops.insert_contact(tx, data, at)
        else:
            data.email = None
            ops.apply_update(tx, contact_id, data, at)
        for name in item.get("tags", []):
            if name.strip():
                ops.add_contact_tag(tx, contact_id, ops.ensure_tag(tx.db, name))
        _link_account(tx, contact_id, _text(item, "customer_acct_name"))
        for key, status in (("subscribe", 1), ("unsubscribe", 2)):
            for entry in item.get(key, []):
                list_id = int(entry["listid"])
                if tx.db.execute("SELECT 1 FROM lists WHERE id = ?", (list_id,)).fetchone():
                    ops.set_list_status(tx, contact_id, list_id, status)
        success.append(str(contact_id))
    return success, failure


def _link_account(tx: Tx, contact_id: int, name: str | None) -> None:
    if not name:
        return
    account_id = ops.find_account(tx.db, name) or ops.insert_account(tx.db, name)
    if not tx.db.execute(
        "SELECT 1 FROM account_contacts WHERE contact_id = ?", (contact_id,)
    ).fetchone():
        ops.link_account(tx.db, contact_id, account_id, "")


class ImportQueue:
    """Queued batches live in SQLite (so `import/info` survives restarts); one thread applies them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.blanks = BLANK_READINGS[0]
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, contacts: list[dict[str, Any]]) -> str:
        """Store a validated batch and queue it; returns its batchId."""
        batch_id = str(uuid.uuid4())
        with self.store.write() as tx:
            tx.db.execute(
                "INSERT INTO import_batches (id, status, contacts, payload, cdate)"
                " VALUES (?, 'processing', ?, ?, ?)",
                (batch_id, len(contacts), json.dumps(contacts), now()),
            )
        self._queue.put(batch_id)
        return batch_id

    def start(self) -> None:
        """Start the worker, resuming batches left unprocessed by a previous run."""
        pending = self.store.conn().execute(
            "SELECT id FROM import_batches WHERE status = 'processing' ORDER BY cdate, rowid"
        )
        for (batch_id,) in pending:
            self._queue.put(batch_id)
        self._thread = threading.Thread(target=self._run, name="ac-bulk-import", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the batch in hand."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while (batch_id := self._queue.get()) is not None:
            try:
                self.process(batch_id)
            except Exception:
                log.exception("bulk import batch %s failed", batch_id)

    def process(self, batch_id: str) -> None:
        """Apply one batch in one transaction (no webhooks: AC fires none for imports)."""
        with self.store.write(source="import", publish=False) as tx:
            row = tx.db.execute(
                "SELECT payload FROM import_batches WHERE id = ? AND status = 'processing'",
                (batch_id,),
            ).fetchone()
            if row is None:
                return
            success, failure = import_contacts(tx, json.loads(row[0]), self.blanks)
            tx.db.execute(
                "UPDATE import_batches SET status = 'completed', payload = NULL, success = ?,"
                " failure = ?, completed = ? WHERE id = ?",
                (json.dumps(success), json.dumps(failure), now(), batch_id),
            )

    def info(self, batch_id: str) -> dict[str, Any] | None:
        """GET /import/info: `processing` until applied, then `completed` with ids and emails."""
        row = (
            self.store.conn()
            .execute(
                "SELECT status, success, failure FROM import_batches WHERE id = ?", (batch_id,)
            )
            .fetchone()
        )
        if row is None:
            return None
        status, success, failure = row
        if status != "completed":
            return {"status": status, "success": [], "failure": []}
        return {"status": status, "success": json.loads(success), "failure": json.loads(failure)}

    def overview(self) -> dict[str, Any]:
        """GET /import/bulk_import: outstanding and recently completed batches per day."""
        groups: dict[str, dict[str, list[int]]] = {
            "outstanding": defaultdict(lambda: [0, 0]),
            "recentlyCompleted": defaultdict(lambda: [0, 0]),
        }
        for status, contacts, cdate in self.store.conn().execute(
            "SELECT status, contacts, cdate FROM import_batches"
        ):
            key = "recentlyCompleted" if status == "completed" else "outstanding"
            day = datetime.fromtimestamp(cdate, ACCOUNT_TZ).strftime("%Y-%m-%d")
            groups[key][day][0] += 1
            groups[key][day][1] += contacts
        return {
            key: [
                {"forDate": day, "batches": str(batches), "contacts": str(count)}
                for day, (batches, count) in sorted(days.items())
            ]
            for key, days in groups.items()
        }
