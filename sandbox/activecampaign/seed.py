"""Deterministic fake ActiveCampaign contacts, written straight into the emulator's SQLite."""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sandbox.activecampaign import deals, ops
from sandbox.activecampaign.store import Store, Tx

# Seeded timestamps lie in a fixed past window, so the same seed gives the same data any day.
_WINDOW_START = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
_WINDOW_SECONDS = 540 * 86_400

FIRST_NAMES = (
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "David",
    "Elizabeth", "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah",
    "Charles", "Karen", "Daniel", "Nancy", "Matthew", "Lisa", "Anthony", "Betty", "Mark", "Sandra",
    "Giulia", "Marco", "Sofia", "Luca", "Emma", "Noah", "Olivia", "Liam", "Aisha", "Wei", "Priya",
    "Hiroshi", "Fatima", "Carlos", "Ana", "Pierre", "Ingrid", "Lars", "Katarzyna", "Mehmet",
)  # fmt: skip
LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor",
    "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Clark", "Rossi",
    "Bianchi", "Schmidt", "Fischer", "Dubois", "Nakamura", "Kowalski", "Jensen", "Patel", "Chen",
)  # fmt: skip
# Real-world names that break naive code: accents, apostrophes, hyphens, non-Latin letters.
AWKWARD_FIRST = (
    "José", "Zoë", "Łukasz", "Søren", "François", "Björn", "Chloé", "Renée", "Mária", "Dônal",
    "Seán", "Ólafur", "Ãngela", "Jürgen", "Núria",
)  # fmt: skip
AWKWARD_LAST = (
    "O'Brien", "D'Angelo", "Müller", "García-Márquez", "Nuñez", "Ødegård", "Dvořák", "N'Diaye",
    "O'Connor-Smythe", "Çelik", "van der Berg", "St. John", "Þórsson", "MacLeod", "de la Cruz",
)  # fmt: skip
LONG_FIRST = "Maximiliana Alexandrina Wilhelmina-Theodora"
LONG_LAST = "Featherstonehaugh-Cholmondeley-Marjoribanks of Wolfeschlegelsteinhausen"
DOMAINS = (
    "example.com", "example.org", "example.net", "mail.example.com", "example.co.uk",
    "example.it", "example.de",
)  # fmt: skip
COMPANIES = (
    "Acme Corp", "Globex", "Initech", "Umbrella Ltd", "Stark Industries", "Wayne Enterprises",
    "Hooli", "Vandelay Industries", "Soylent & Co.", "Müller GmbH", "L'Oréal Partners",
    "O'Reilly Logistics", "Pied Piper", "Tyrell S.p.A.",
)  # fmt: skip
JOB_TITLES = (
    "Marketing Manager", "Sales Director", "CEO", "CTO", "Account Executive", "Data Engineer",
    "Head of Growth", "Office Manager", "VP, Customer Success", "Responsabile Acquisti",
)  # fmt: skip
TAGS = ("Newsletter", "Webinar: Spring 2025", "Customer", "Prospect", "VIP", "Trade show 2024")
SEED_FIELDS = (("COMPANY", "Company"), ("JOB_TITLE", "Job Title"))


@dataclass(frozen=True)
class FakeContact:
    """One generated contact."""

    email: str
    first_name: str
    last_name: str
    phone: str
    company: str
    job_title: str
    tags: tuple[str, ...]
    cdate: int
    udate: int | None


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def fake_contact(rng: random.Random, index: int) -> FakeContact:
    """The `index`-th contact of a seeded stream (about one in five is awkward on purpose)."""
    roll = rng.random()
    first = rng.choice(AWKWARD_FIRST if roll < 0.12 else FIRST_NAMES)
    last = rng.choice(AWKWARD_LAST if 0.06 < roll < 0.2 else LAST_NAMES)
    if roll > 0.99:
        first, last = LONG_FIRST, LONG_LAST
    local = f"{_ascii(first)[:20]}.{_ascii(last)[:30]}{index}"
    email = f"{local}@{rng.choice(DOMAINS)}"
    if rng.random() < 0.1:
        email = email.title()  # mixed case: AC compares emails case-insensitively
    phone = (
        "" if rng.random() < 0.15 else f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
    )
    cdate = _WINDOW_START + rng.randrange(_WINDOW_SECONDS)
    udate = cdate + rng.randrange(86_400 * 30) if rng.random() < 0.6 else None
    company = "" if rng.random() < 0.1 else rng.choice(COMPANIES)
    job_title = "" if rng.random() < 0.2 else rng.choice(JOB_TITLES)
    tags = tuple(sorted(set(rng.sample(TAGS, rng.randint(0, 2)))))
    return FakeContact(email, first, last, phone, company, job_title, tags, cdate, udate)


def _ensure_field(tx: Tx, perstag: str, title: str) -> int:
    row = tx.db.execute("SELECT id FROM fields WHERE perstag = ?", (perstag,)).fetchone()
    if row:
        return int(row[0])
    return ops.create_field(tx, {"field": {"title": title, "type": "text", "perstag": perstag}})


def _write(
    tx: Tx, contact: FakeContact, field_ids: dict[str, int], tag_ids: dict[str, int]
) -> bool:
    values = [
        (field_ids[perstag], value)
        for perstag, value in (("COMPANY", contact.company), ("JOB_TITLE", contact.job_title))
        if value
    ]
    data = ops.ContactInput(
        email=contact.email,
        first_name=contact.first_name,
        last_name=contact.last_name,
        phone=contact.phone,
        field_values=values,
    )
    existing = ops.find_contact_by_email(tx.db, contact.email)
    if existing is None:
        contact_id = ops.insert_contact(tx, data, contact.cdate)
        if contact.udate is not None:
            tx.db.execute("UPDATE contacts SET udate = ? WHERE id = ?", (contact.udate, contact_id))
    else:
        contact_id = existing
        data.email = None
        ops.apply_update(tx, contact_id, data, contact.udate or contact.cdate)
    for name in contact.tags:
        ops.add_contact_tag(tx, contact_id, tag_ids[name])
    return existing is None


def seed_activecampaign(data_dir: Path, *, seed: int, contacts: int) -> dict[str, int]:
    """Write `contacts` deterministic fake contacts (upserted by email) plus the COMPANY and
    JOB_TITLE fields, a few marketing tags and, when there is no pipeline, the default pipeline
    with its three stages. Works whether or not the server is running.
    """
    store = Store(data_dir)
    rng = random.Random(seed)
    created = updated = 0
    batch = 5000
    with store.write(source="import", publish=False) as tx:
        field_ids = {perstag: _ensure_field(tx, perstag, title) for perstag, title in SEED_FIELDS}
        tag_ids = {name: ops.ensure_tag(tx.db, name) for name in TAGS}
        # AC accounts come with a pipeline: one with its three default stages, if none exists.
        if (pipeline := deals.ensure_default_pipeline(tx)) is not None:
            tx.db.execute(  # dated like the rest of the seed: same seed, same data, any day
                "UPDATE deal_groups SET cdate = ?, udate = ? WHERE id = ?",
                (_WINDOW_START, _WINDOW_START, pipeline),
            )
        pipelines = int(tx.db.execute("SELECT COUNT(*) FROM deal_groups").fetchone()[0])
    for start in range(0, contacts, batch):
        with store.write(source="import", publish=False) as tx:
            for index in range(start, min(start + batch, contacts)):
                if _write(tx, fake_contact(rng, index), field_ids, tag_ids):
                    created += 1
                else:
                    updated += 1
    return {
        "contacts_created": created,
        "contacts_updated": updated,
        "fields": 2,
        "tags": len(TAGS),
        "pipelines": pipelines,
    }
