"""ActiveCampaign webhooks: what the receiver accepts, how an event is keyed and queued.

AC posts a form (PHP-style keys, `contact[email]`), at least once and never again on failure
(`activecampaign-api.md` §2.13): the receiver keys each event by its content, so a redelivery
is stored once, and polling stays the safety net for the events that never arrive.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

#: The Airflow connection of the receiver: host = the public base URL of the Airflow API server
#: as ActiveCampaign calls it (`https://airflow.example.com`), password = the shared secret.
WEBHOOK_CONN_ID = "activecampaign_webhook"
#: Where the API server serves the receiver; the secret is the last path segment.
RECEIVER_PATH = "/crm-sync-webhooks/activecampaign"
#: The webhook's name in ActiveCampaign (how `webhooks status|remove` find ours).
WEBHOOK_NAME = "crm-sync: Dynamics 365"
#: What the sync listens to: tags given and taken, field updates, new subscribers.
EVENTS = ("contact_tag_added", "contact_tag_removed", "update", "subscribe")
#: Who may have caused it: everything but `api`, so the sync does not hear its own writes.
SOURCES = ("public", "admin", "system")
#: The shortest secret the receiver and `webhooks install` accept.
MIN_SECRET_LENGTH = 24
#: The contact's fields a payload carries, by the sync's name for them.
PAYLOAD_FIELDS = {
    "email": "contact[email]",
    "firstName": "contact[first_name]",
    "lastName": "contact[last_name]",
    "phone": "contact[phone]",
}
#: A stored value is cut at this length (AC's own limits are lower; the receiver stores no more).
MAX_VALUE_LENGTH = 1000


def receiver_url(base_url: str, secret: str) -> str:
    """The URL ActiveCampaign posts to."""
    return f"{base_url.rstrip('/')}{RECEIVER_PATH}/{secret}"


def masked_url(url: str) -> str:
    """`url` with the secret (its last path segment) hidden, for printing and logs."""
    head, _, _secret = url.rstrip("/").rpartition("/")
    return f"{head}/***" if RECEIVER_PATH in url else url


@dataclass(frozen=True)
class WebhookEvent:
    """One event as stored: what it is about and the contact as the payload showed it."""

    event_type: str
    contact_id: str
    occurred_at: datetime | None
    #: `email`, `firstName`, `lastName`, `phone` and `tags` (a list of names), as posted; None
    #: for a key the form lacked.
    contact: dict[str, Any]
    key: str


class BadPayload(ValueError):
    """A post that is not an ActiveCampaign contact event the sync listens to."""


def parse_form(pairs: Iterable[tuple[str, str]]) -> WebhookEvent:
    """A form AC posted as an event; `BadPayload` names what is missing (never a value)."""
    items = list(pairs)
    form = dict(items)
    event_type = form.get("type", "")
    if event_type not in EVENTS:
        raise BadPayload(f"event type {event_type[:40]!r} is not one the sync listens to")
    contact_id = form.get("contact[id]", "").strip()
    if not (contact_id.isascii() and contact_id.isdigit() and len(contact_id) <= 20):
        raise BadPayload("no contact[id]")
    # A key the form lacks stays None (unknown), apart from an empty value (blank).
    tags = form.get("contact[tags]")
    contact = {
        **{name: _text(form.get(key)) for name, key in PAYLOAD_FIELDS.items()},
        "tags": None if tags is None else [t.strip()[:255] for t in tags.split(",") if t.strip()],
    }
    moment = _moment(form.get("date_time"))
    # The whole form, in order: a redelivery is the same bytes, a new event differs somewhere.
    key = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()
    return WebhookEvent(event_type, contact_id, moment, contact, key)


def _text(value: str | None) -> str | None:
    return None if value is None else value[:MAX_VALUE_LENGTH]


def _moment(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        stamp = pd.Timestamp(value)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        return None
    moment: datetime = stamp.tz_convert("UTC").to_pydatetime()
    return moment
