"""Webhook delivery: form-encoded POSTs, sent once, never retried; a 410 deactivates the hook."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import requests

from sandbox.activecampaign.store import Event, Store, iso

log = logging.getLogger(__name__)

# Only these events are scoped by a webhook's `listid`; AC ignores it for tag events and others.
LIST_EVENTS = frozenset({"subscribe", "unsubscribe"})
DELIVERY_TIMEOUT = 5.0


@dataclass(frozen=True)
class Delivery:
    """One POST to make."""

    webhook_id: int
    url: str
    event: str
    payload: list[tuple[str, str]]


def build_payload(store: Store, event: Event) -> list[tuple[str, str]] | None:
    """The PHP-style form fields AC posts (`contact[email]`, ...); None if the contact is gone.

    `contact[tags]` is one comma-separated string and custom fields come as an unlabelled list
    (`contact[fields][0]`, ...), as real payloads do: receivers should re-fetch the contact.
    """
    db = store.conn()
    row = db.execute(
        "SELECT c.id, c.email, c.first_name, c.last_name, c.phone, a.id, a.name FROM contacts c"
        " LEFT JOIN account_contacts ac ON ac.contact_id = c.id"
        " LEFT JOIN accounts a ON a.id = ac.account_id WHERE c.id = ?",
        (event.contact_id,),
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
    pairs = [
        ("type", event.type),
        ("date_time", iso(event.at) or ""),
        ("initiated_from", event.source),
        ("initiated_by", event.source),
        ("list", str(event.list_id)),
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
    if event.tag:
        pairs.append(("tag", event.tag))
    if event.type == "update":
        values = db.execute(
            "SELECT value FROM field_values WHERE contact_id = ? ORDER BY field_id", (contact_id,)
        )
        pairs += [(f"contact[fields][{i}]", value) for i, (value,) in enumerate(values)]
    return pairs


class WebhookDispatcher:
    """Turns committed events into deliveries and sends them from one background thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._log: deque[dict[str, Any]] = deque(maxlen=1000)
        self._log_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._session = requests.Session()
        self._session.trust_env = False  # local receivers: never through a proxy from the env

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
            for wid, url in targets if payload is not None else []:
                self._queue.put(Delivery(wid, url, event.type, payload or []))

    def start(self) -> None:
        """Start the sender thread."""
        self._thread = threading.Thread(target=self._run, name="ac-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sender thread after the deliveries already queued."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def deliveries(self) -> list[dict[str, Any]]:
        """The most recent delivery attempts (oldest first)."""
        with self._log_lock:
            return list(self._log)

    def clear(self) -> None:
        """Drop queued deliveries and the log (used by the admin reset)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
        with self._log_lock:
            self._log.clear()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._send(item)

    def _send(self, delivery: Delivery) -> None:
        status, error = 0, None
        try:
            response = self._session.post(
                delivery.url, data=delivery.payload, timeout=DELIVERY_TIMEOUT
            )
            status = response.status_code
        except requests.RequestException as exc:
            error = type(exc).__name__
        if status == 410:
            with self.store.write() as tx:
                tx.db.execute("UPDATE webhooks SET active = 0 WHERE id = ?", (delivery.webhook_id,))
        log.info("webhook %s %s -> %s", delivery.webhook_id, delivery.event, status or error)
        with self._log_lock:
            self._log.append(
                {
                    "webhook": str(delivery.webhook_id),
                    "event": delivery.event,
                    "url": delivery.url,
                    "status": status,
                    "error": error,
                    "deactivated": status == 410,
                }
            )
