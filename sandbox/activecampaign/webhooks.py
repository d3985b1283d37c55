"""Webhook delivery: form-encoded POSTs, sent once, never retried; a 410 deactivates the hook.

AC does not document how many deliveries it makes at once. The emulator sends one at a time
by default; `PUT /_sandbox/webhooks/senders` sets up to `MAX_SENDERS` at once (a contact's
deliveries keep their order: they go through one sender, chosen by the contact's id).

Delivery faults (`/_sandbox/webhooks/faults`) lose the next deliveries or send each twice, for
the tests of a receiver: AC promises at least once and never retries.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import requests
from fastapi import APIRouter
from pydantic import BaseModel, Field

from sandbox.activecampaign.store import Event, Store, iso, plain_local

log = logging.getLogger(__name__)

# Only these events are scoped by a webhook's `listid`; AC ignores it for tag events and others.
LIST_EVENTS = frozenset({"subscribe", "unsubscribe"})
DEAL_EVENTS = frozenset({"deal_add", "deal_update"})
ACCOUNT_EVENTS = frozenset({"account_add", "account_update"})
ACCOUNT_CONTACT_EVENTS = frozenset({"account_contact_add", "account_contact_update"})
CURRENCY_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "cad": "$", "aud": "$"}
DELIVERY_TIMEOUT = 5.0
MAX_SENDERS = 16


class DeliveryFault(BaseModel):
    """What happens to the next `count` deliveries: `lose` (not sent, logged as lost) or
    `duplicate` (each sent twice)."""

    kind: Literal["lose", "duplicate"]
    count: int = Field(1, ge=1, le=100_000)


class SendersBody(BaseModel):
    """How many deliveries the emulator makes at once."""

    senders: int = Field(1, ge=1, le=MAX_SENDERS)


@dataclass
class _Pending:
    """A queued delivery fault and how many deliveries it still applies to."""

    kind: str
    remaining: int


@dataclass(frozen=True)
class Delivery:
    """One POST to make."""

    webhook_id: int
    url: str
    event: str
    payload: list[tuple[str, str]]


def _envelope(event: Event) -> list[tuple[str, str]]:
    return [
        ("type", event.type),
        ("date_time", iso(event.at) or ""),
        ("initiated_from", event.source),
        ("initiated_by", event.source),
        ("list", str(event.list_id)),
    ]


def _contact_block(db: sqlite3.Connection, contact_id: int) -> list[tuple[str, str]] | None:
    """`contact[...]` and the account fields that go with it; None if the contact is gone."""
    row = db.execute(
        "SELECT c.id, c.email, c.first_name, c.last_name, c.phone, a.id, a.name FROM contacts c"
        " LEFT JOIN account_contacts ac ON ac.contact_id = c.id"
        " LEFT JOIN accounts a ON a.id = ac.account_id WHERE c.id = ?",
        (contact_id,),
    ).fetchone()
    if row is None:
        return None
    contact_id, email, first, last, phone, account_id, account_name = row
    tags = [
        name
        for (name,) in db.execute(
            "SELECT t.tag FROM contact_tags ct JOIN tags t ON t.id = ct.tag_id"
            " WHERE ct.contact_id = ? ORDER BY ct.id",
            (contact_id,),
        )
    ]
    account = account_name or ""
    return [
        ("contact[id]", str(contact_id)),
        ("contact[email]", email),
        ("contact[first_name]", first),
        ("contact[last_name]", last),
        ("contact[phone]", phone),
        ("contact[ip]", "0"),
        ("contact[tags]", ", ".join(tags)),
        ("contact[customer_acct_name]", account),
        ("contact[orgname]", account),
        ("customer_acct_name", account),
        ("customer_acct_id", str(account_id or 0)),
        ("orgname", account),
    ]


def _account_block(db: sqlite3.Connection, account_id: int) -> list[tuple[str, str]] | None:
    """`account[...]` (AsyncAPI `AccountBlock`; custom values keyed by field label)."""
    row = db.execute(
        "SELECT id, name, account_url, cdate, udate FROM accounts WHERE id = ?", (account_id,)
    ).fetchone()
    if row is None:
        return None
    pairs = [
        ("account[id]", str(row[0])),
        ("account[name]", row[1]),
        ("account[account_url]", row[2] or ""),
        ("account[created_timestamp]", plain_local(row[3])),
        ("account[updated_timestamp]", plain_local(row[4])),
    ]
    for label, value in db.execute(
        "SELECT m.label, d.value FROM account_field_data d JOIN account_field_meta m"
        " ON m.id = d.field_id WHERE d.owner_id = ? ORDER BY m.id",
        (account_id,),
    ):
        stored = json.loads(value)
        shown = "||".join(stored) if isinstance(stored, list) else str(stored)
        pairs.append((f"account[fields][{label}]", shown))
    return pairs


def _deal_block(db: sqlite3.Connection, deal_id: int) -> tuple[list[tuple[str, str]], int] | None:
    """`deal[...]` (AsyncAPI `DealBlock`) and the deal's contact id; None if the deal is gone.

    `deal[value]` is in currency units with two decimals (UNCONFIRMED: the docs' samples are
    formatted amounts); the owner is the one user (Sandbox Admin).
    """
    row = db.execute(
        "SELECT d.id, d.title, d.cdate, d.account_id, a.name, d.stage_id, s.title, d.group_id,"
        " g.title, d.value, d.currency, d.owner, d.contact_id, c.email, c.first_name,"
        " c.last_name, d.status FROM deals d"
        " LEFT JOIN accounts a ON a.id = d.account_id"
        " LEFT JOIN deal_stages s ON s.id = d.stage_id"
        " LEFT JOIN deal_groups g ON g.id = d.group_id"
        " LEFT JOIN contacts c ON c.id = d.contact_id WHERE d.id = ?",
        (deal_id,),
    ).fetchone()
    if row is None:
        return None
    (did, title, cdate, account_id, account_name, stage_id, stage_title, group_id, group_title,
     value, currency, owner, contact_id, email, first, last, status) = row  # fmt: skip
    pairs = [
        ("deal[id]", str(did)),
        ("deal[title]", title),
        ("deal[create_date]", plain_local(cdate)),
        ("deal[orgid]", str(account_id or 0)),
        ("deal[orgname]", account_name or ""),
        ("deal[stageid]", str(stage_id)),
        ("deal[stage_title]", stage_title or ""),
        ("deal[pipelineid]", str(group_id)),
        ("deal[pipeline_title]", group_title or ""),
        ("deal[value]", f"{value / 100:,.2f}"),
        ("deal[currency]", currency),
        ("deal[currency_symbol]", CURRENCY_SYMBOLS.get(currency, currency.upper())),
        ("deal[owner]", str(owner)),
        ("deal[owner_firstname]", "Sandbox"),
        ("deal[owner_lastname]", "Admin"),
        ("deal[contactid]", str(contact_id or 0)),
        ("deal[contact_email]", email or ""),
        ("deal[contact_firstname]", first or ""),
        ("deal[contact_lastname]", last or ""),
        ("deal[status]", str(status)),
    ]
    return pairs, contact_id or 0


def build_payload(store: Store, event: Event) -> list[tuple[str, str]] | None:
    """The PHP-style form fields AC posts (`contact[email]`, ...); None if the record is gone.

    `contact[tags]` is one comma-separated string and custom fields come as an unlabelled list
    (`contact[fields][0]`, ...), as real payloads do: receivers should re-fetch the contact.
    Deal events carry the deal's contact (if any) and `deal[...]`; account events `account[...]`;
    account_contact events the contact, the account and `accountContact[...]` (AsyncAPI file).
    """
    db = store.conn()
    pairs = _envelope(event)
    if event.type in DEAL_EVENTS:
        deal = _deal_block(db, event.deal_id)
        if deal is None:
            return None
        block, contact_id = deal
        pairs += (_contact_block(db, contact_id) or []) if contact_id else []
        return pairs + block
    if event.type in ACCOUNT_EVENTS:
        account = _account_block(db, event.account_id)
        return None if account is None else pairs + account
    contact = _contact_block(db, event.contact_id)
    if contact is None:
        return None
    pairs += contact
    if event.type in ACCOUNT_CONTACT_EVENTS:
        account = _account_block(db, event.account_id)
        link = db.execute(
            "SELECT account_id, contact_id, job_title FROM account_contacts WHERE id = ?",
            (event.link_id,),
        ).fetchone()
        if account is None or link is None:
            return None
        return pairs + account + [
            ("customer_account_id", str(link[0])),
            ("accountContact[id]", str(event.link_id)),
            ("accountContact[account]", str(link[0])),
            ("accountContact[contact]", str(link[1])),
            ("accountContact[job_title]", link[2]),
        ]  # fmt: skip
    if event.tag:
        pairs.append(("tag", event.tag))
    if event.type == "update":
        values = db.execute(
            "SELECT value FROM field_values WHERE contact_id = ? ORDER BY field_id",
            (event.contact_id,),
        )
        pairs += [(f"contact[fields][{i}]", value) for i, (value,) in enumerate(values)]
    return pairs


class WebhookDispatcher:
    """Turns committed events into deliveries and sends them from background threads: one by
    default, `senders` at once when set (a contact's deliveries always through the same one)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.senders = 1
        self._queues: list[queue.Queue[Delivery | None]] = [
            queue.Queue() for _ in range(MAX_SENDERS)
        ]
        self._log: deque[dict[str, Any]] = deque(maxlen=1000)
        self._log_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._faults: deque[_Pending] = deque()  # under the log lock
        self._local = threading.local()

    def publish(self, events: list[Event]) -> None:
        """Queue a delivery for every active webhook that listens to each event."""
        hooks = [
            (wid, url, set(json.loads(names)), set(json.loads(sources)), listid)
            for wid, url, names, sources, listid in self.store.conn().execute(
                "SELECT id, url, events, sources, listid FROM webhooks WHERE active = 1"
            )
        ]
        if not hooks:
            return
        for event in events:
            targets = [
                (wid, url)
                for wid, url, names, sources, listid in hooks
                if event.type in names
                and event.source in sources
                and (listid == 0 or event.type not in LIST_EVENTS or listid == event.list_id)
            ]
            payload = build_payload(self.store, event) if targets else None
            sender = self._queues[event.contact_id % self.senders]
            for wid, url in targets if payload is not None else []:
                sender.put(Delivery(wid, url, event.type, payload or []))

    def start(self) -> None:
        """Start the sender threads (idle ones wait on their empty queues)."""
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"ac-webhooks-{n}", daemon=True)
            for n, q in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the sender threads after the deliveries already queued."""
        for sender in self._queues:
            sender.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    def set_senders(self, senders: int) -> None:
        """Deliver through `senders` threads from now on (deliveries queued stay in order)."""
        self.senders = senders

    def deliveries(self) -> list[dict[str, Any]]:
        """The most recent delivery attempts (oldest first)."""
        with self._log_lock:
            return list(self._log)

    def clear(self) -> None:
        """Drop queued deliveries, the log and the delivery faults, and deliver one at a time
        again (used by the admin reset)."""
        self.senders = 1
        for sender in self._queues:
            while True:
                try:
                    item = sender.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    sender.put(None)
                    break
        with self._log_lock:
            self._log.clear()
            self._faults.clear()

    def add_fault(self, fault: DeliveryFault) -> None:
        """Queue a delivery fault (after those already queued)."""
        with self._log_lock:
            self._faults.append(_Pending(fault.kind, fault.count))

    def faults(self) -> list[dict[str, Any]]:
        """The queued delivery faults and how many deliveries each still applies to."""
        with self._log_lock:
            return [{"kind": f.kind, "remaining": f.remaining} for f in self._faults]

    def clear_faults(self) -> None:
        """Drop the queued delivery faults."""
        with self._log_lock:
            self._faults.clear()

    def _take_fault(self) -> str | None:
        with self._log_lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.popleft()
            return fault.kind

    def _run(self, sender: queue.Queue[Delivery | None]) -> None:
        session = requests.Session()
        session.trust_env = False  # local receivers: never through a proxy from the env
        self._local.session = session
        while (item := sender.get()) is not None:
            try:
                self._deliver(item)
            except Exception:  # one bad delivery must not stop the ones after it
                log.exception("webhook %s %s: delivery failed", item.webhook_id, item.event)

    def _deliver(self, delivery: Delivery) -> None:
        fault = self._take_fault()
        if fault == "lose":
            log.info("webhook %s %s -> lost (sandbox fault)", delivery.webhook_id, delivery.event)
            self._record(delivery, 0, None, fault="lost")
            return
        if self._send(delivery) != 410 and fault == "duplicate":
            self._send(delivery, fault="duplicate")

    def _send(self, delivery: Delivery, fault: str | None = None) -> int:
        """POST once; the status (0 when no answer came)."""
        status, error = 0, None
        try:
            response = self._local.session.post(
                delivery.url, data=delivery.payload, timeout=DELIVERY_TIMEOUT
            )
            status = response.status_code
        except requests.RequestException as exc:
            error = type(exc).__name__
        if status == 410:
            with self.store.write() as tx:
                tx.db.execute("UPDATE webhooks SET active = 0 WHERE id = ?", (delivery.webhook_id,))
        log.info("webhook %s %s -> %s", delivery.webhook_id, delivery.event, status or error)
        self._record(delivery, status, error, fault=fault)
        return status

    def _record(
        self, delivery: Delivery, status: int, error: str | None, *, fault: str | None
    ) -> None:
        with self._log_lock:
            self._log.append(
                {
                    "webhook": str(delivery.webhook_id),
                    "event": delivery.event,
                    "url": delivery.url,
                    "status": status,
                    "error": error,
                    "deactivated": status == 410,
                    "fault": fault,
                }
            )


def admin_routes(dispatcher: WebhookDispatcher) -> APIRouter:
    """`/_sandbox/webhooks/...`: the delivery log and the delivery faults."""
    router = APIRouter(prefix="/webhooks", tags=["sandbox admin"])

    @router.put("/senders")
    def set_senders(body: SendersBody) -> dict[str, Any]:
        dispatcher.set_senders(body.senders)
        return {"senders": dispatcher.senders}

    @router.get("/senders")
    def get_senders() -> dict[str, Any]:
        return {"senders": dispatcher.senders}

    @router.get("/deliveries")
    def deliveries() -> dict[str, Any]:
        return {"deliveries": dispatcher.deliveries()}

    @router.post("/faults")
    def add_fault(fault: DeliveryFault) -> dict[str, Any]:
        dispatcher.add_fault(fault)
        return {"queued": fault.model_dump(), "faults": dispatcher.faults()}

    @router.get("/faults")
    def list_faults() -> dict[str, Any]:
        return {"faults": dispatcher.faults()}

    @router.delete("/faults")
    def clear_faults() -> dict[str, Any]:
        dispatcher.clear_faults()
        return {"cleared": True}

    return router
