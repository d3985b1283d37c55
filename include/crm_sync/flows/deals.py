"""Dynamics 365 opportunities -> ActiveCampaign deals, one way (as AC's native integration does),
inside the five tasks of `dynamics365_to_activecampaign` and of the initial sync.

An opportunity becomes a deal of the AC pipeline `opportunities.pipeline` (created by the load,
with the stages of `opportunities.stages`, when missing): its topic the title, its estimated
revenue the value (cents), its sales stage the stage, won / lost the status, its owner the AC
user `opportunities.owners` names (else `owner_default`), in `opportunities.currency`.

Who the deal is with: the AC contact linked to the opportunity's contact (`parentcontactid`, or
the customer when it is a contact), else the one linked to its account's primary contact; and
the AC account linked to its account (`parentaccountid`, or the customer when it is an account).
With neither, the opportunity is quarantined (`no_deal_contact`) and looked at again on every
run, so it syncs once its contact or account has. The load resolves them again after this run's
contacts and accounts were written: an opportunity and its new contact sync in the same run
(the initial sync among them).

Echo suppression: the link (`crm_sync_object_links`, kind `opportunity`) holds what was last
written to the deal, and a later run writes only the fields whose new value differs from it.
Dynamics is the source: a deal field a salesperson changed in AC is overwritten only when
Dynamics changes that field. A deal deleted in AC is created again (and relinked) by the next
write it needs; nothing is asked of AC for an opportunity whose deal needs no write.

Crash safety: each deal's link is saved right after its create. A create whose answer was lost
(the hook does not send it again) is looked for in AC before it is sent once more. A load marks
in the state store when it begins creating, and that it finished; the next load after one that
died in between (the task's retry, or a later run) looks for each deal it is about to create
among the pipeline's deals changed since the mark (same title, value, contact and account, and
no link) and links the one it finds instead. What is left: a deal someone else made in AC in
that window, with the very same title, value, contact and account, would be taken for it; and
the first load to finish after the one that died ends the search, so a deal that load created
for an opportunity the finishing load does not read (a backfill that died, followed by a
scheduled run) is created again when that opportunity next changes.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pandas as pd
from crm_connectors.errors import ApiConnectionError, ClientError, NotFoundError

from crm_sync.context import StepContext
from crm_sync.core import Direction, System
from crm_sync.errors import ConfigurationError
from crm_sync.flows import activecampaign, common
from crm_sync.records import Action, Reason, clean_text
from crm_sync.settings import SALES_STAGES, OpportunitySettings
from crm_sync.stages import DEAL_PLAN, DEAL_VALID, OBJECT_PLAN_COLUMNS, OPPORTUNITIES
from crm_sync.state import ObjectLink, RecordLink, Watermark, content_hash, utcnow
from crm_sync.validation import AC_MAX_LENGTH, TargetRules, validate_records

log = logging.getLogger("crm_sync")

KIND = "opportunity"  # the object links of deals, and the cursor's stream
KEY = "opportunity:"  # record keys: opportunity:<opportunityid>
ENTITY_SET = "opportunities"
PRIMARY_ID = "opportunityid"
COLUMNS = (
    PRIMARY_ID, "name", "description", "estimatedvalue", "salesstage", "statecode",
    "_ownerid_value", "_parentaccountid_value", "_parentcontactid_value", "_customerid_value",
    "modifiedon",
)  # fmt: skip
META = "opportunities_meta"  # extract's note of whether this was the initial sync
#: The state store's mark of a load creating deals (`cursor`: "creating", then "done"; `value`:
#: when it began), so that the next load after one that died finds the deals it created.
CREATING = f"{Direction.TO_ACTIVECAMPAIGN.value}:deals_creating"
#: How far AC's clock may be behind ours, when looking for deals created by an earlier attempt.
CLOCK_SKEW = timedelta(minutes=10)
#: AC deal values are whole cents, 0 or more; Dataverse Money goes up to 1,000,000,000,000.
MAX_CENTS = 100 * 10**12
STILL_QUARANTINED = "still_quarantined"
#: Reasons that depend on other records (the contact's or account's link): looked at again on
#: every run instead of waiting for the opportunity to change.
RECHECKED = frozenset({Reason.NO_DEAL_CONTACT.value})
WRITES = (Action.NEW_DEAL.value, Action.UPDATE_DEAL.value)
#: The opportunity frame as extract stages it (`OPPORTUNITIES` plus these).
FRAME_COLUMNS = (
    "dataverse_id", "dv_modified_at", "record_key", "name", "description", "estimatedvalue",
    "salesstage", "statecode", "owner_id", "contact_dv", "account_dv", "primary_contact_dv",
)  # fmt: skip
#: The plan (`DEAL_PLAN`): `payload` the fields to write, `synced_values` the deal after the
#: write, `deal` the deal as Dynamics says it (parties as resolved then), and the Dynamics
#: parties, for the load to resolve them again.
PLAN_COLUMNS = (
    *OBJECT_PLAN_COLUMNS, "deal", "contact_dv", "account_dv", "primary_contact_dv", "missing",
)  # fmt: skip


# -- the mapping (pure) -------------------------------------------------------------------------
def cents(amount: Any) -> int:
    """A Dataverse Money amount in whole cents, halves away from zero; empty is 0."""
    if amount is None or pd.isna(amount):
        return 0
    return int((Decimal(str(amount)) * 100).to_integral_value(rounding=ROUND_HALF_UP))


def deal_status(statecode: Any) -> int:
    """AC's deal status of an opportunity's `statecode`: 1 won, 2 lost, else 0 open."""
    try:
        state = int(statecode)
    except (TypeError, ValueError):
        return 0
    return state if state in (1, 2) else 0


def deal_values(opportunity: Mapping[str, Any], settings: OpportunitySettings) -> dict[str, Any]:
    """The deal an opportunity (a row of the extract's frame) stands for, without its contact
    and account; the pipeline and stage by title."""
    owner = _id(opportunity.get("owner_id"))
    return {
        "title": clean_text(opportunity.get("name")),
        "value": cents(opportunity.get("estimatedvalue")),
        "currency": settings.currency,
        "pipeline": settings.pipeline,
        "stage": settings.stage_of(opportunity.get("salesstage")),
        "status": deal_status(opportunity.get("statecode")),
        "owner": settings.owner_of(owner) if owner else settings.owner_default,
        "description": _memo(opportunity.get("description")),
    }


@dataclass(frozen=True)
class Parties:
    """The AC contact and account a deal names (None: none linked) and, with neither, why."""

    contact: str | None = None
    account: str | None = None
    missing: str | None = None


def parties_of(
    refs: Mapping[str, Any], contacts: Mapping[str, str], accounts: Mapping[str, str]
) -> Parties:
    """The deal's parties from the opportunity's Dynamics contact, account and the account's
    primary contact (`refs`), given the AC ids of linked contacts and accounts by Dynamics id."""
    contact_dv, account_dv, primary_dv = (
        _id(refs.get(c)) for c in ("contact_dv", "account_dv", "primary_contact_dv")
    )
    contact = contacts.get(contact_dv) if contact_dv else None
    if contact is None and primary_dv:
        contact = contacts.get(primary_dv)
    account = accounts.get(account_dv) if account_dv else None
    if contact or account:
        return Parties(contact, account)
    parts = []
    if contact_dv:
        parts.append(f"its contact {contact_dv} is not linked to an ActiveCampaign contact yet")
    if account_dv:
        parts.append(f"its account {account_dv} is not linked to an ActiveCampaign account yet")
        if primary_dv and primary_dv != contact_dv:
            parts.append(f"nor is the account's primary contact {primary_dv}")
    if not parts:
        return Parties(
            missing="it names no contact and no account in Dynamics 365, and an ActiveCampaign "
            "deal needs one of them"
        )
    return Parties(missing="; ".join(parts) + ": it syncs once one of them has synced")


def keep_parties(values: Mapping[str, Any], synced: Mapping[str, Any]) -> dict[str, Any]:
    """`values`, with the parties last written kept when it names neither (a deal needs one:
    one no longer linked is left as it is in AC)."""
    if values.get("contact") or values.get("account"):
        return dict(values)
    return {**values, "contact": synced.get("contact"), "account": synced.get("account")}


def changed_fields(wanted: Mapping[str, Any], synced: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `wanted` whose value differs from what was last written (`synced`)."""
    return {k: v for k, v in wanted.items() if k not in synced or synced[k] != v}


def opportunity_frame(
    rows: list[dict[str, Any]], primary_contacts: Mapping[str, str | None]
) -> pd.DataFrame:
    """Opportunities as read (Web API rows) as the extract stages them. `primary_contacts`: the
    accounts among their customers and accounts, with their primary contact: a customer that
    is one of them is the account, another customer the contact."""
    records = []
    for row in rows:
        customer = _id(row.get("_customerid_value"))
        is_account = customer is not None and customer in primary_contacts
        account = _id(row.get("_parentaccountid_value")) or (customer if is_account else None)
        contact = _id(row.get("_parentcontactid_value")) or (None if is_account else customer)
        dataverse_id = str(row[PRIMARY_ID])
        records.append(
            {
                "dataverse_id": dataverse_id,
                "dv_modified_at": row.get("modifiedon"),
                "record_key": KEY + dataverse_id,
                "name": row.get("name"),
                "description": row.get("description"),
                "estimatedvalue": row.get("estimatedvalue"),
                "salesstage": row.get("salesstage"),
                "statecode": row.get("statecode"),
                "owner_id": _id(row.get("_ownerid_value")),
                "contact_dv": contact,
                "account_dv": account,
                "primary_contact_dv": primary_contacts.get(account) if account else None,
            }
        )
    frame = pd.DataFrame(records, columns=list(FRAME_COLUMNS))
    frame["dv_modified_at"] = pd.to_datetime(frame["dv_modified_at"], utc=True)
    return OPPORTUNITIES.conform(frame)


def plan_deals(
    opportunities: pd.DataFrame,
    settings: OpportunitySettings,
    links: Mapping[str, ObjectLink],
    parties: Mapping[str, Parties],
    quarantined: Mapping[str, tuple[str | None, str]] | None = None,
) -> pd.DataFrame:
    """What to do with each opportunity: create its deal, update the fields that changed since
    the last write (`links`: the deal links by opportunity id), or nothing. `quarantined`:
    open entries (record key -> (source hash, reason codes)); an unchanged one waits."""
    waiting = quarantined or {}
    rows = []
    for opportunity in opportunities.to_dict("records"):
        dataverse_id = str(opportunity["dataverse_id"])
        key = KEY + dataverse_id
        found = parties.get(dataverse_id, Parties())
        values = {
            **deal_values(opportunity, settings),
            "contact": found.contact,
            "account": found.account,
        }
        source_hash = content_hash(values)
        link = links.get(dataverse_id)
        row: dict[str, Any] = {
            "record_key": key,
            "dataverse_id": dataverse_id,
            "ac_id": link.ac_id if link else None,
            "reason": None,
            "source_hash": source_hash,
            "relink": False,
            "deal": _json(values),
            **{
                c: _id(opportunity.get(c))
                for c in ("contact_dv", "account_dv", "primary_contact_dv")
            },
            "missing": found.missing,
        }
        entry = waiting.get(key)
        if entry and entry[0] == source_hash and not set(entry[1].split(",")) & RECHECKED:
            row.update(action=Action.NOT_ELIGIBLE.value, reason=STILL_QUARANTINED)
            row.update(payload="{}", synced_values="{}", n_fields=0, unchanged=False)
        elif link is None:
            row.update(action=Action.NEW_DEAL.value, payload=_json(values))
            row.update(synced_values=_json(values), n_fields=len(values), unchanged=False)
            if found.missing:  # created only if the load finds them linked by then
                row["reason"] = Reason.NO_DEAL_CONTACT.value
        else:
            wanted = keep_parties(values, link.synced_values)
            changes = changed_fields(wanted, link.synced_values)
            row.update(action=Action.UPDATE_DEAL.value, payload=_json(changes))
            row.update(synced_values=_json(wanted), n_fields=len(changes), unchanged=not changes)
        rows.append(row)
    out = DEAL_PLAN.conform(pd.DataFrame(rows, columns=list(PLAN_COLUMNS)))
    out["n_fields"] = out["n_fields"].astype("int64")
    out["unchanged"] = out["unchanged"].astype(bool)
    out["relink"] = out["relink"].astype(bool)
    return out


def value_failures(deals: Mapping[str, Mapping[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """Deals (by record key) whose value AC cannot hold: below 0, or above Dataverse's range."""
    failures: dict[str, list[tuple[str, str]]] = {}
    for key, deal in deals.items():
        value = int(deal.get("value") or 0)
        if not 0 <= value <= MAX_CENTS:
            failures[key] = [
                (
                    Reason.VALUE_OUT_OF_RANGE,
                    f"its estimated revenue ({value / 100:.2f}) is outside what an "
                    f"ActiveCampaign deal holds (0 to {MAX_CENTS // 100})",
                )
            ]
    return failures


def check_deals(deals: Mapping[str, Mapping[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """The deals (by record key) AC would refuse, with why: a title (required, at most 255
    characters: Great Expectations) and the value's range."""
    failures = value_failures(deals)
    if deals:
        frame = pd.DataFrame(
            {
                "record_key": list(deals),
                "title": pd.array([d.get("title") for d in deals.values()], dtype="string"),
            }
        )
        rules = TargetRules(
            name="ActiveCampaign deal",
            email_column=None,
            required=("title",),
            max_length={"title": AC_MAX_LENGTH},
        )
        for key, reasons in validate_records(frame, rules).failures.items():
            failures.setdefault(key, []).extend(reasons)
    return failures


def plan_counts(plan: pd.DataFrame) -> dict[str, int]:
    """A plan's summary: deals to create, update, left unchanged, waiting, not eligible."""
    new = plan["action"] == Action.NEW_DEAL.value
    waiting = new & (plan["reason"] == Reason.NO_DEAL_CONTACT.value)
    counts = {
        "deals: create": int((new & ~waiting).sum()),
        "deals: waiting for a linked contact or account": int(waiting.sum()),
        "deals: update": int(
            ((plan["action"] == Action.UPDATE_DEAL.value) & ~plan["unchanged"]).sum()
        ),
        "deals: unchanged": int(plan["unchanged"].sum()),
    }
    not_eligible = plan.loc[plan["action"] == Action.NOT_ELIGIBLE.value, "reason"]
    for reason, n in not_eligible.value_counts().items():
        counts[f"deals not eligible: {reason}"] = int(n)
    return {k: v for k, v in counts.items() if v}


def _id(value: Any) -> str | None:
    """A Dataverse id (or other reference) as text; None when empty."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    text = str(value).strip()
    return text or None


def _memo(value: Any) -> str:
    """A multi-line text as AC keeps it: trimmed, line breaks kept; empty is ''."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return str(value).strip()


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# -- settings and reads -------------------------------------------------------------------------
def _settings(ctx: StepContext) -> OpportunitySettings:
    return ctx.settings.opportunities


def _moves(ctx: StepContext) -> bool:
    """Whether this run syncs opportunities (the backfill: when its form chose both entities)."""
    chosen = ctx.run_params.entities if ctx.is_backfill else "both"
    return (
        _settings(ctx).enabled and ctx.direction is Direction.TO_ACTIVECAMPAIGN and chosen == "both"
    )


def _changed(ctx: StepContext, since: datetime | None) -> list[dict[str, Any]]:
    """Opportunities matching `record_criteria` modified at or after `since` (None: all)."""
    hook, criteria = ctx.dv_hook, _settings(ctx).record_criteria
    try:
        if since is None:
            rows = hook.query(
                ENTITY_SET,
                select=COLUMNS,
                filter=criteria,
                orderby=f"modifiedon asc,{PRIMARY_ID} asc",
            )
        else:
            rows = hook.modified_since(
                ENTITY_SET, since, select=COLUMNS, filter=criteria, primary_id=PRIMARY_ID
            )
        return list(rows)
    except ClientError as error:
        if error.status != 400 or not criteria:
            raise
        raise ConfigurationError(
            f"Dataverse refused the filter of opportunities.record_criteria in sync.yaml "
            f"({error.message}). This is a configuration error: fix the filter (a column the "
            "opportunity table has, a literal of the column's type), or set it to null"
        ) from error


def _by_id(
    ctx: StepContext, entity_set: str, primary_id: str, ids: list[str], select: tuple[str, ...]
) -> list[dict[str, Any]]:
    wanted: list[object] = [uuid.UUID(i) for i in dict.fromkeys(ids) if i]
    if not wanted:
        return []
    criteria = _settings(ctx).record_criteria if entity_set == ENTITY_SET else None
    return list(ctx.dv_hook.find(entity_set, primary_id, wanted, select=select, filter=criteria))


def _primary_contacts(ctx: StepContext, rows: list[dict[str, Any]]) -> dict[str, str | None]:
    """The accounts among the opportunities' accounts and customers, with their primary
    contact (one query per 50)."""
    ids = [
        ref
        for row in rows
        for ref in (_id(row.get("_parentaccountid_value")), _id(row.get("_customerid_value")))
        if ref
    ]
    found = _by_id(ctx, "accounts", "accountid", ids, ("accountid", "_primarycontactid_value"))
    return {str(r["accountid"]): _id(r.get("_primarycontactid_value")) for r in found}


class _ContactIds(Mapping[str, str]):
    """The AC contact ids of linked Dynamics contacts, by Dynamics id; a link a bulk import
    wrote without the id has it looked up by email when first asked for (one request)."""

    def __init__(self, ctx: StepContext, links: list[RecordLink]) -> None:
        self._ctx = ctx
        self._links = {lk.dataverse_id: lk for lk in links if lk.entity == "contact"}
        self._known: dict[str, str | None] = {}

    def __getitem__(self, dataverse_id: str) -> str:
        if dataverse_id not in self._known:
            link = self._links[dataverse_id]
            self._known[dataverse_id] = activecampaign.contact_id_of(
                self._ctx.ac_hook, link.ac_contact_id, link.email
            )
        found = self._known[dataverse_id]
        if found is None:
            raise KeyError(dataverse_id)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._links)

    def __len__(self) -> int:
        return len(self._links)


def _parties(ctx: StepContext, refs: pd.DataFrame) -> dict[str, Parties]:
    """The deal parties of each opportunity of `refs`, by its id, from the links as they are."""
    if refs.empty:
        return {}
    contact_ids = pd.concat([refs["contact_dv"], refs["primary_contact_dv"]]).dropna()
    account_ids = refs["account_dv"].dropna().astype(str).tolist()
    contacts = _ContactIds(ctx, ctx.store.links_for(dataverse_ids=contact_ids.astype(str)))
    accounts = {
        lk.dataverse_id: lk.ac_id
        for lk in ctx.store.object_links("account", dataverse_ids=account_ids)
    }
    return {
        str(row["dataverse_id"]): parties_of(row, contacts, accounts)
        for row in refs.to_dict("records")
    }


# -- extract ------------------------------------------------------------------------------------
def extract(
    ctx: StepContext, started: datetime
) -> tuple[dict[str, int], dict[str, str | None], list[str]]:
    """Read the opportunities changed since the cursor (the first run: all of them, the initial
    sync; the backfill: since its form's day), and those waiting in the quarantine; stage them.
    Returns counts, {cursor name: newest `modifiedon` read}, and ["opportunity"] when this is
    the stream's first read."""
    if not _moves(ctx):
        return {}, {}, []
    cursor, read = common.stream_read(ctx, KIND, started)
    changed = _changed(ctx, read.since)
    seen = {str(r[PRIMARY_ID]) for r in changed}
    waiting = [
        e.record_key.removeprefix(KEY)
        for e in ctx.store.open_quarantine(ctx.direction)
        if e.record_key.startswith(KEY) and e.record_key.removeprefix(KEY) not in seen
    ]
    retried = _by_id(ctx, ENTITY_SET, PRIMARY_ID, waiting, COLUMNS)
    rows = changed + retried
    frame = opportunity_frame(rows, _primary_contacts(ctx, rows))
    ctx.staging.write(OPPORTUNITIES, frame)
    ctx.staging.write_json("extract", META, {"initial": read.initial})
    newest = pd.to_datetime(pd.Series([r.get("modifiedon") for r in changed]), utc=True).max()
    if read.initial:
        counts = {"opportunities read for the initial sync (first run)": len(changed)}
    else:
        new, again = common.new_and_again(read, (r.get("modifiedon") for r in changed))
        counts = {
            "opportunities changed": new,
            "opportunities read again (overlap window)": again,
        }
    counts["opportunities retried from quarantine"] = len(retried)
    mark = newest.isoformat() if changed and not pd.isna(newest) else None
    return counts, {cursor.name: mark}, [KIND] if read.initial else []


# -- plan (map_fields) --------------------------------------------------------------------------
def plan(ctx: StepContext) -> dict[str, int]:
    """Map each opportunity read to its deal and decide: create, update the changed fields,
    nothing, or wait (still quarantined). Stages the plan; returns its counts."""
    if not _moves(ctx):
        return {}
    opportunities = ctx.staging.read(OPPORTUNITIES)
    ids = opportunities["dataverse_id"].astype(str).tolist()
    links = {lk.dataverse_id: lk for lk in ctx.store.object_links(KIND, dataverse_ids=ids)}
    quarantined = {
        e.record_key: (e.source_hash, e.reason_code)
        for e in ctx.store.open_quarantine(ctx.direction)
        if e.record_key.startswith(KEY)
    }
    out = plan_deals(
        opportunities, _settings(ctx), links, _parties(ctx, opportunities), quarantined
    )
    ctx.staging.write(DEAL_PLAN, out)
    return plan_counts(out)


# -- validate -----------------------------------------------------------------------------------
def validate(ctx: StepContext) -> tuple[dict[str, int], int]:
    """Check the deals to write against AC's rules (a title of at most 255 characters, a value
    of 0 or more cents); quarantine the others; stage the valid ones. Returns counts and how
    many writes count towards the mass-change breaker (the initial sync's creates do not)."""
    if not _moves(ctx):
        return {}, 0
    planned = ctx.staging.read(DEAL_PLAN)
    writing = planned["action"].isin(WRITES)
    to_write = planned[writing & ~planned["unchanged"]]
    deals = (
        {k: json.loads(v) for k, v in zip(to_write["record_key"], to_write["deal"], strict=True)}
        if not to_write.empty
        else {}
    )
    failures = check_deals(deals)
    common.quarantine_rows(ctx, planned, "validate", failures)
    valid = planned[writing & ~planned["record_key"].isin(list(failures))]
    # An opportunity still waiting for its contact or account is written only if the load
    # finds one linked by then (a contact this run creates, counted with the contacts): it
    # is not a change of its own, for the breaker nor for the pipeline check.
    missing = valid.get("missing", pd.Series(None, index=valid.index, dtype=object))
    changing = valid[~valid["unchanged"] & missing.isna()]
    if not changing.empty:
        check_pipeline_currency(ctx)
    ctx.staging.write(DEAL_VALID, valid)
    counts: Counter[str] = Counter(
        {"deals valid": len(changing), "deals quarantined": len(failures)}
    )
    counts.update(f"deals quarantined: {code}" for items in failures.values() for code, _ in items)
    initial = bool(ctx.staging.read_json("extract", META).get("initial"))
    if ctx.is_backfill or initial:
        changing = changing[changing["action"] == Action.UPDATE_DEAL.value]
    return {k: v for k, v in counts.items() if v}, len(changing)


def check_pipeline_currency(ctx: StepContext) -> None:
    """Before anything is written: an existing pipeline in another currency than
    `opportunities.currency` is a configuration error (its deals' values would be read in the
    wrong currency)."""
    settings = _settings(ctx)
    for pipeline in ctx.ac_hook.list_pipelines(title=settings.pipeline):
        if pipeline.get("title") == settings.pipeline:
            _same_currency(pipeline, settings)


def _same_currency(pipeline: Mapping[str, Any], settings: OpportunitySettings) -> None:
    currency = str(pipeline.get("currency") or "").lower()
    if currency and currency != settings.currency:
        raise ConfigurationError(
            f"the ActiveCampaign pipeline '{settings.pipeline}' is in {currency}, but "
            f"opportunities.currency in sync.yaml says {settings.currency}: set it to the "
            "pipeline's currency, or name another pipeline (opportunities.pipeline)"
        )


# -- load ---------------------------------------------------------------------------------------
def planned(ctx: StepContext) -> dict[str, int]:
    """A dry run's plan for deals (nothing was written)."""
    if not _moves(ctx):
        return {}
    return {f"{k} (planned)": v for k, v in plan_counts(ctx.staging.read(DEAL_VALID)).items()}


def load(ctx: StepContext) -> dict[str, int]:
    """Write the valid deals, each linked as soon as it is written; a deal AC refuses is
    quarantined with AC's reason and the others go on. Called under the direction's write lock,
    after the contacts and accounts: the parties are resolved again first."""
    if not _moves(ctx):
        return {}
    valid = ctx.staging.read(DEAL_VALID)
    if valid.empty:
        return {}
    return _DealLoader(ctx).load(valid)


class _DealLoader:
    """Writes one run's deals to AC, keeping the links and the quarantine."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.hook = ctx.ac_hook
        self.settings = _settings(ctx)
        self.counts: Counter[str] = Counter()
        self.failures: dict[str, list[tuple[str, str]]] = {}
        self.synced: list[str] = []
        self._stages: tuple[str, dict[str, str]] | None = None
        # After a load that died while creating (this run's, or an earlier run's): each create
        # looks for its deal among those changed in AC since that load began creating.
        mark = ctx.store.watermark(CREATING)
        self.resumed = mark.value if mark is not None and mark.cursor == "creating" else None
        self.marked = self.resumed is not None
        self._recent: list[dict[str, Any]] | None = None

    def load(self, valid: pd.DataFrame) -> dict[str, int]:
        ids = valid["dataverse_id"].astype(str).tolist()
        links = {lk.dataverse_id: lk for lk in self.ctx.store.object_links(KIND, dataverse_ids=ids)}
        deals = {k: json.loads(v) for k, v in zip(valid["record_key"], valid["deal"], strict=True)}
        # A contact or account this run linked since the plan (written before the deals).
        unresolved = [
            (d["contact"] is None and bool(_id(c) or _id(p)))
            or (d["account"] is None and bool(_id(a)))
            for d, c, p, a in zip(
                deals.values(),
                valid["contact_dv"],
                valid["primary_contact_dv"],
                valid["account_dv"],
                strict=True,
            )
        ]
        again = _parties(self.ctx, valid[unresolved])
        for row in valid.to_dict("records"):
            key, dataverse_id = row["record_key"], str(row["dataverse_id"])
            values = deals[key]
            found = again.get(dataverse_id)
            if found is not None:
                values["contact"] = values["contact"] or found.contact
                values["account"] = values["account"] or found.account
            try:
                self._sync(row, values, links.get(dataverse_id), found)
            except ClientError as error:
                code = f" [{error.code}]" if error.code else ""
                self.failures[key] = [
                    (
                        Reason.TARGET_REJECTED.value,
                        f"ActiveCampaign refused the deal: HTTP {error.status}{code}: "
                        f"{error.message}",
                    )
                ]
                log.warning("deal of opportunity %s refused by ActiveCampaign", dataverse_id)
        if self.failures:
            common.quarantine_rows(self.ctx, valid, "load", self.failures)
            self.counts.update(
                f"deals quarantined: {code}"
                for items in self.failures.values()
                for code, _ in items
            )
        self.ctx.store.resolve(self.synced, self.ctx.direction)
        mark = self.ctx.store.watermark(CREATING)
        if self.marked and mark is not None:  # every create is linked (or was refused)
            self.ctx.store.advance_watermark(Watermark(CREATING, mark.value, "done"))
        return dict(self.counts)

    def _sync(
        self,
        row: dict[str, Any],
        values: dict[str, Any],
        link: ObjectLink | None,
        found: Parties | None,
    ) -> None:
        """Create, update or leave one deal."""
        if link is None:
            self._create(row, values, found, "deals created")
            return
        wanted = keep_parties(values, link.synced_values)
        changes = changed_fields(wanted, link.synced_values)
        if not changes:
            self.counts["deals unchanged"] += 1
            self.synced.append(row["record_key"])
            return
        try:
            self.hook.update_deal(link.ac_id, **self._attributes(changes, wanted))
        except NotFoundError:
            log.info("deal %s deleted in ActiveCampaign: created again", link.ac_id)
            self._create(row, wanted, found, "deals re-created (deleted in ActiveCampaign)")
            return
        self._link(row, link.ac_id, wanted, "deals updated")

    def _create(
        self, row: dict[str, Any], values: dict[str, Any], found: Parties | None, what: str
    ) -> None:
        if not (values["contact"] or values["account"]):
            missing = (found.missing if found else None) or row.get("missing") or ""
            self.failures[row["record_key"]] = [(Reason.NO_DEAL_CONTACT.value, missing)]
            return
        pipeline, stages = self._pipeline()
        attributes = {
            "value": int(values["value"]),
            "currency": values["currency"],
            "pipeline": pipeline,
            "stage": stages[values["stage"]],
            "owner": values["owner"],
            "contact": values["contact"],
            "account": values["account"],
            "status": int(values["status"]),
            "description": values["description"] or None,
        }
        if not self.marked:
            self.ctx.store.advance_watermark(Watermark(CREATING, utcnow(), "creating"))
            self.marked = True
        deal = self._created_before(values, pipeline) if self.resumed else None
        if deal is not None:
            what = "deals linked after an interrupted load"
        else:
            sent = utcnow()
            try:
                deal = self.hook.create_deal(values["title"], **attributes)
            except ApiConnectionError:  # the answer was lost: AC may hold the deal
                deal = self._created_before(values, pipeline, since=sent)
                if deal is None:
                    deal = self.hook.create_deal(values["title"], **attributes)
        self._link(row, str(deal["id"]), values, what)

    def _link(self, row: dict[str, Any], deal_id: str, values: dict[str, Any], what: str) -> None:
        """Save the deal's link at once, with what was written."""
        link = ObjectLink(KIND, str(row["dataverse_id"]), deal_id, System.DYNAMICS365.value, values)
        if self.ctx.store.save_object_links([link]):
            self.failures[row["record_key"]] = [
                (
                    Reason.TARGET_REJECTED.value,
                    f"ActiveCampaign deal {deal_id} was written, but another opportunity's link "
                    "holds it: the link was not moved",
                )
            ]
            return
        self.counts[what] += 1
        self.synced.append(row["record_key"])

    def _attributes(self, changes: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
        """The AC attributes of an update that writes `changes` (a new pipeline or stage moves
        the deal to the stage: the pipeline follows it)."""
        attributes: dict[str, Any] = {}
        for key, value in changes.items():
            if key in ("pipeline", "stage"):
                attributes["stage"] = self._pipeline()[1][wanted["stage"]]
            elif key in ("value", "status"):
                attributes[key] = int(value)
            else:
                attributes[key] = value
        return attributes

    def _pipeline(self) -> tuple[str, dict[str, str]]:
        """The id of the deals' pipeline and its stage ids by title; the pipeline and the stages
        `opportunities.stages` names are created when missing (once per load)."""
        if self._stages is None:
            title = self.settings.pipeline
            found = [p for p in self.hook.list_pipelines(title=title) if p.get("title") == title]
            if found:
                pipeline = min(found, key=lambda p: int(p["id"]))
                _same_currency(pipeline, self.settings)
            else:
                pipeline = self.hook.create_pipeline(title, self.settings.currency)
                self.counts["AC pipeline created"] += 1
            pipeline_id = str(pipeline["id"])
            stages = {str(s["title"]): str(s["id"]) for s in pipeline.get("dealStages") or []}
            for sales_stage in SALES_STAGES.values():
                wanted = self.settings.stages[sales_stage]
                if wanted not in stages:
                    stages[wanted] = str(self.hook.create_stage(pipeline_id, wanted)["id"])
                    self.counts["AC deal stages created"] += 1
            self._stages = (pipeline_id, stages)
        return self._stages

    def _created_before(
        self, values: Mapping[str, Any], pipeline: str, *, since: datetime | None = None
    ) -> dict[str, Any] | None:
        """The deal an earlier attempt created for `values`, if AC holds one: a deal of the
        pipeline changed since that attempt (`since`, else since the load that died began
        creating; less `CLOCK_SKEW`) with the same title, value, contact and account and no
        link; the newest of them. Compared here: no title goes into a URL (or a log line)."""
        if since is None:
            if self._recent is None:
                assert self.resumed is not None
                self._recent = self._deals_since(pipeline, self.resumed)
            deals = self._recent
        else:
            deals = self._deals_since(pipeline, since)
        candidates = [
            deal
            for deal in deals
            if deal.get("title") == values["title"]
            and _id(deal.get("contact")) == values["contact"]
            and _id(deal.get("account") or deal.get("organization")) == values["account"]
            and int(deal.get("value") or 0) == int(values["value"])
        ]
        held = {
            lk.ac_id
            for lk in self.ctx.store.object_links(KIND, ac_ids=[str(d["id"]) for d in candidates])
        }
        free = [d for d in candidates if str(d["id"]) not in held]
        return max(free, key=lambda d: int(d["id"])) if free else None

    def _deals_since(self, pipeline: str, since: datetime) -> list[dict[str, Any]]:
        return list(self.hook.list_deals(pipeline=pipeline, updated_after=since - CLOCK_SKEW))
