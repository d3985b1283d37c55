"""Deterministic fake leads, contacts, accounts and opportunities, with a share of awkward
real-world records."""

from __future__ import annotations

import random
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Any

from sandbox.dataverse.auth import ADMIN_USER_ID
from sandbox.dataverse.schema import ENTITIES, SALES_STAGES
from sandbox.dataverse.store import Store
from sandbox.dataverse.writes import QUALIFY_COPY, Writer, date_epoch

FIRST_NAMES = [
    "Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira",
    "Liam", "Maya", "Noah", "Olivia", "Pavel", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
    "Will", "Xenia", "Yusuf", "Zoe",
]  # fmt: skip
LAST_NAMES = [
    "Smith", "Johnson", "Brown", "Taylor", "Anderson", "Clark", "Lewis", "Walker", "Hall",
    "Young", "King", "Wright", "Scott", "Green", "Baker", "Adams", "Nelson", "Hill", "Campbell",
    "Mitchell", "Roberts", "Carter", "Phillips", "Evans", "Turner", "Parker",
]  # fmt: skip
# Names that break naive code: accents, apostrophes, hyphens, particles, non-Latin scripts.
AWKWARD_FIRST = [
    "José", "Zoë", "François", "Łukasz", "Søren", "Björn", "Anaïs", "Renée", "Ñusta", "Đorđe",
]  # fmt: skip
AWKWARD_LAST = [
    "O'Brien", "D'Angelo", "Müller", "García-López", "van der Berg", "Nguyễn", "Ó Súilleabháin",
    "Çelik", "Dvořák", "O'Connor-Smythe",
]  # fmt: skip
COMPANIES = [
    "Acme Corp", "Globex", "Initech", "Umbrella Ltd", "Stark Industries", "Wayne Enterprises",
    "Hooli", "Vandelay Industries", "Soylent", "Tyrell Corp", "Müller & Söhne GmbH",
    "L'Oréal Partner Network", "Smith, Jones & Partners",
]  # fmt: skip
JOB_TITLES = [
    "Marketing Manager", "Sales Director", "CTO", "Office Manager", "Buyer", "Consultant",
    "Head of Growth", "Procurement Lead", "CEO", "Data Analyst",
]  # fmt: skip
SUBJECTS = [
    "Interested in the enterprise plan", "Webinar follow-up", "Trade show contact",
    "Requested a demo", "Pricing question", "Newsletter sign-up", "Partner referral",
]  # fmt: skip
DOMAINS = ["example.com", "example.org", "example.net", "mail.example.com", "corp.example"]
CITIES = [("Milano", "Italy"), ("Berlin", "Germany"), ("Austin", "United States"),
          ("Lyon", "France"), ("Kraków", "Poland"), ("Leeds", "United Kingdom")]  # fmt: skip
AWKWARD_SHARE = 0.2
# Account names that break naive code: accents, apostrophes, ampersands, commas, non-Latin
# scripts, and one right at the 160-character MaxLength (built in `_account`).
AWKWARD_ACCOUNTS = [
    "Société Générale d'Équipement", "O'Reilly & Sons, Ltd.", "Łódzkie Zakłady Włókiennicze",
    "Nguyễn Trading Co.", "株式会社サンプル", "Ärzte ohne Grenzen e.V.", "A/B Testing \"Lab\"",
]  # fmt: skip
PRODUCTS = [
    "Enterprise plan", "Annual renewal", "Onboarding package", "Support upgrade", "Pilot project",
    "Extra seats", "Consulting days",
]  # fmt: skip
# The pipeline phase (stepname) a sales stage shows in the Sales app's default process, and a
# typical probability for it (UNCONFIRMED: sample values, orgs configure their own).
STAGE_STEPS = {stage: f"{stage + 1}-{label}" for stage, label in SALES_STAGES.items()}
STAGE_PROBABILITY = {0: 10, 1: 40, 2: 70, 3: 90}


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum() or ch in "'.-")


def _person(rng: random.Random, index: int, seed: int) -> dict[str, Any]:
    awkward = rng.random() < AWKWARD_SHARE
    first = rng.choice(AWKWARD_FIRST if awkward and rng.random() < 0.5 else FIRST_NAMES)
    last = rng.choice(AWKWARD_LAST if awkward else LAST_NAMES)
    if awkward and rng.random() < 0.15:
        # A long double-barrelled name right at the 50-character MaxLength.
        last = (last + "-" + "-".join(rng.sample(LAST_NAMES, 6)))[:50]
    local = f"{_ascii(first)}.{_ascii(last)}".strip(".")[:40] or "contact"
    domain = rng.choice(DOMAINS)
    email = f"{local}.{seed}.{index}@{domain}"
    if awkward and rng.random() < 0.4:
        # Mixed case, as people type it: the match key must still match case-insensitively.
        email = f"{local.title()}.{seed}.{index}@{domain.upper()}"
    phone = (
        None if rng.random() < 0.2 else f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
    )
    city, country = rng.choice(CITIES)
    return {
        "firstname": first,
        "lastname": last,
        "emailaddress1": email,
        "telephone1": phone,
        "jobtitle": rng.choice(JOB_TITLES) if rng.random() < 0.8 else None,
        "address1_city": city,
        "address1_country": country,
    }


def seed_dataverse(
    data_dir: Path,
    *,
    seed: int,
    leads: int,
    contacts: int,
    accounts: int = 0,
    opportunities: int = 0,
) -> dict[str, int]:
    """Write `leads` leads, `contacts` contacts, `accounts` accounts and `opportunities`
    opportunities; the same seed gives the same rows.

    Works with or without the server running (same SQLite file). Rows with the same ids are
    replaced, so seeding twice with one seed is idempotent. A few leads come qualified, each with
    the contact it became (counted among `contacts`), and a few are disqualified. With accounts,
    about 60 % of the contacts work for one (`parentcustomerid`) and most accounts have a primary
    contact; opportunities belong mostly to accounts, some to contacts, and some are won or lost.
    The accounts and opportunities draw from their own random stream, so the leads and contacts
    of a seed are the same whether or not they are asked for (apart from `parentcustomerid`).
    """
    rng = random.Random(seed)
    store = Store(data_dir)
    lead_entity, contact_entity = ENTITIES["leads"], ENTITIES["contacts"]
    now = int(time.time())
    lead_rows: list[dict[str, Any]] = []
    contact_rows: list[dict[str, Any]] = []
    for i in range(leads):
        row = _person(rng, i, seed)
        row.update(
            leadid=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            companyname=rng.choice(COMPANIES) if rng.random() < 0.85 else None,
            subject=rng.choice(SUBJECTS),
            leadsourcecode=rng.randint(1, 10) if rng.random() < 0.7 else None,
            statecode=0,
            statuscode=rng.choice((1, 2)),
        )
        roll = rng.random()
        if roll < 0.05 and len(contact_rows) < contacts:
            row.update(statecode=1, statuscode=3)
            contact = {name: row.get(name) for name in QUALIFY_COPY}
            contact.update(
                contactid=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                originatingleadid=row["leadid"],
                company=(row.get("companyname") or "")[:50] or None,
                statecode=0,
                statuscode=1,
            )
            contact_rows.append(contact)
        elif roll < 0.1:
            row.update(statecode=2, statuscode=rng.choice((4, 5, 6, 7)))
        lead_rows.append(row)
    for i in range(len(contact_rows), contacts):
        row = _person(rng, leads + i, seed)
        inactive = rng.random() < 0.03
        row.update(
            contactid=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            company=rng.choice(COMPANIES)[:50] if rng.random() < 0.6 else None,
            statecode=1 if inactive else 0,
            statuscode=2 if inactive else 1,
        )
        contact_rows.append(row)
    extra = random.Random(f"{seed}/accounts")
    account_rows = [_account(extra, i, seed) for i in range(accounts)]
    if account_rows:
        members: dict[str, list[str]] = {}
        for contact in contact_rows:
            if extra.random() < 0.6:
                account = extra.choice(account_rows)
                contact["parentcustomerid"] = account["accountid"]
                members.setdefault(account["accountid"], []).append(contact["contactid"])
        for account in account_rows:
            staff = members.get(account["accountid"])
            if staff and extra.random() < 0.8:
                account["primarycontactid"] = extra.choice(staff)
    opportunity_rows = [
        _opportunity(extra, i, now, account_rows, contact_rows) for i in range(opportunities)
    ]
    tables = (
        (lead_entity, lead_rows),
        (contact_entity, contact_rows),
        (ENTITIES["accounts"], account_rows),
        (ENTITIES["opportunities"], opportunity_rows),
    )
    with store.transaction() as conn:
        for entity, rows in tables:
            if not rows:
                continue
            first = store.next_versions(conn, len(rows))
            complete = []
            for offset, values in enumerate(rows):
                row = dict.fromkeys(entity.columns)
                row.update(values)
                row.update(
                    ownerid=ADMIN_USER_ID,
                    createdby=ADMIN_USER_ID,
                    modifiedby=ADMIN_USER_ID,
                    createdon=now,
                    modifiedon=now,
                    versionnumber=first + offset,
                )
                for flag in ("donotemail", "donotbulkemail", "donotphone", "donotpostalmail"):
                    if flag in entity.columns:
                        row[flag] = 0
                Writer.computed(row, entity)
                complete.append(row)
            ids = [(r[entity.primary_id],) for r in complete]
            conn.executemany(f"DELETE FROM {entity.entity_set} WHERE {entity.primary_id} = ?", ids)
            store.insert(conn, entity, complete)
    store.close()
    counts = {"leads": len(lead_rows), "contacts": len(contact_rows)}
    if accounts or opportunities:
        counts.update(accounts=len(account_rows), opportunities=len(opportunity_rows))
    return counts


def _account(rng: random.Random, index: int, seed: int) -> dict[str, Any]:
    awkward = rng.random() < AWKWARD_SHARE
    base = rng.choice(AWKWARD_ACCOUNTS if awkward else COMPANIES)
    name = f"{base} {index + 1}"
    if awkward and rng.random() < 0.1:
        # A long legal name right at the 160-character MaxLength.
        filler = " ".join(rng.sample(COMPANIES, len(COMPANIES)))
        name = f"{base} Holding {filler}"[:159] + str(index % 10)
    domain = rng.choice(DOMAINS)
    city, country = rng.choice(CITIES)
    inactive = rng.random() < 0.05
    return {
        "accountid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "name": name,
        "accountnumber": f"ACC-{seed}-{index}",
        "emailaddress1": f"info.{seed}.{index}@{domain}" if rng.random() < 0.8 else None,
        "telephone1": f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
        if rng.random() < 0.8
        else None,
        "websiteurl": f"https://www.{_ascii(base).strip('.') or 'company'}.{index}.example"
        if rng.random() < 0.7
        else None,
        "address1_city": city,
        "address1_country": country,
        "numberofemployees": rng.choice((5, 12, 40, 250, 1200, 18000)),
        "revenue": float(rng.randint(1, 5000) * 10_000),
        "description": "Key account." if rng.random() < 0.2 else None,
        "statecode": 1 if inactive else 0,
        "statuscode": 2 if inactive else 1,
    }


def _opportunity(
    rng: random.Random,
    index: int,
    now: int,
    accounts: list[dict[str, Any]],
    contacts: list[dict[str, Any]],
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "opportunityid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "estimatedvalue": round(rng.randint(500, 250_000) + rng.random(), 2),
    }
    if accounts and (not contacts or rng.random() < 0.8):
        account = rng.choice(accounts)
        staff = [
            c["contactid"] for c in contacts if c.get("parentcustomerid") == account["accountid"]
        ]
        row.update(customerid=account["accountid"], parentaccountid=account["accountid"])
        if staff:
            row["parentcontactid"] = rng.choice(staff)
        company = account["name"]
    elif contacts:
        contact = rng.choice(contacts)
        row.update(customerid=contact["contactid"], parentcontactid=contact["contactid"])
        company = " ".join(p for p in (contact.get("firstname"), contact.get("lastname")) if p)
    else:
        company = rng.choice(COMPANIES)
    row["name"] = f"{company[:250]} - {rng.choice(PRODUCTS)}"
    stage = rng.randint(0, 3)
    day = time.strftime("%Y-%m-%d", time.gmtime(now + rng.randint(-60, 120) * 86400))
    row.update(
        salesstage=stage,
        stepname=STAGE_STEPS[stage],
        closeprobability=STAGE_PROBABILITY[stage],
        estimatedclosedate=date_epoch(day),
        statecode=0,
        statuscode=2 if rng.random() < 0.05 else 1,
    )
    roll = rng.random()
    if roll < 0.1:
        row.update(statecode=1, statuscode=3, actualvalue=row["estimatedvalue"])
        row["actualclosedate"] = row["estimatedclosedate"]
    elif roll < 0.2:
        row.update(statecode=2, statuscode=rng.choice((4, 5)))
        row["actualclosedate"] = row["estimatedclosedate"]
    return row
