"""Accounts <-> ActiveCampaign accounts, both ways, inside the five tasks of each direction DAG
(and the initial sync), and the contacts put on their account on both sides.

Matching (a Dynamics account and an AC account with no link yet): the **name**, compared
without case and with runs of spaces as one, and the **website domain** when both sides have one
(`https://www.Acme.com/about` and `acme.com` agree). Why: AC account names are unique (a second
one is refused, reference §2.12), so the name is the only key AC can hold; Dynamics allows the
same name twice, so the domain tells two companies of one name apart. A name both sides have
with different domains is not a match: towards AC it is refused (`account_name_taken`, AC cannot
hold both); towards Dynamics a new account is created. Two unlinked Dynamics accounts that would
take one AC name, or an AC account whose name several Dynamics accounts hold, are quarantined
(`duplicate_account`): which one is meant cannot be told.

Linked accounts then sync field by field as contacts do (`mapping.plan_writes`: echo
suppression, conflict rules, per-field direction), links in `crm_sync_object_links`.
An AC account deleted while its Dynamics account lives is created again by the next Dynamics ->
AC run that reads it; a Dynamics account deleted is never re-created from AC (its AC account
is refused with `linked_record_missing` until the link is removed).

Contacts and accounts (`accounts.associate_contacts`): a contact's Dynamics `parentcustomerid`
(an account) and its AC account (`accountContacts`) are kept the same, last change wins; the
association last synced is stored as an object link of kind `account_contact`, so nothing is
written while neither side changed it. Dynamics -> AC looks at the contacts the run read and the
contacts of accounts it linked; AC -> Dynamics at the contacts the run writes (an AC association
changed alone, with no change to the contact, waits for the contact's next change).

Costs: Dynamics -> AC reads the changed accounts (one query) and, when there are any, every AC
account (100 a request); AC -> Dynamics reads every AC account (100 a request: AC has no filter
on `updatedTimestamp`) and keeps those updated since its watermark.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
from crm_connectors.errors import (
    ApiConnectionError,
    ClientError,
    NotFoundError,
    RateLimitError,
    ServerError,
)

from crm_sync.context import StepContext
from crm_sync.core import Direction, System
from crm_sync.errors import ConfigurationError
from crm_sync.flows import activecampaign, common
from crm_sync.flows.activecampaign import parse_ac_time
from crm_sync.mapping import MappedField, expand_synced, plan_writes
from crm_sync.records import NEW_ACTIONS, UPDATE_ACTIONS, Action, Reason, clean_text
from crm_sync.settings import AccountSettings
from crm_sync.stages import (
    AC_ACCOUNTS,
    AC_MAPPED,
    ACCOUNT_PLAN,
    ACCOUNT_VALID,
    DV_ACCOUNTS,
    DV_CHANGED,
    OBJECT_PLAN_COLUMNS,
)
from crm_sync.state import ObjectLink
from crm_sync.validation import AC_MAX_LENGTH, UTF16, TargetRules, validate_records

log = logging.getLogger("crm_sync")

KIND = "account"
ASSOCIATION = "account_contact"
ENTITY_SET = "accounts"
PRIMARY_ID = "accountid"
DV_KEY = "account:"  # record keys: account:<accountid> (Dynamics -> AC)
AC_KEY = "ac_account:"  # ac_account:<id> (AC -> Dynamics)
_SPACES = re.compile(r"\s+")
#: The namespace of the ids given to Dynamics accounts created from AC accounts (uuid5 of the AC
#: account's URL): the same AC account always gives the same id.
DYNAMICS_IDS = uuid.UUID("6f1c3a52-8d0e-4b8e-9a77-2f0d5c1e4b21")


# -- the matching key ---------------------------------------------------------------------------
def name_key(value: Any) -> str | None:
    """An account name as the match compares it: cleaned, case-folded, spaces collapsed."""
    text = clean_text(value)
    return _SPACES.sub(" ", text).casefold() if text else None


def domain_of(value: Any) -> str | None:
    """The host of a website, lower-case, without `www.` and port (`https://www.Acme.com/x`
    and `acme.com` give `acme.com`); None when there is none."""
    text = clean_text(value)
    if not text:
        return None
    try:
        host = urlsplit(text if "//" in text else f"//{text}").hostname
    except ValueError:  # not a URL (a stray bracket, full-width characters): no domain
        return None
    if not host:
        return None
    host = host.lower().rstrip(".")
    return host.removeprefix("www.") or None


def _domains_differ(left: Any, right: Any) -> bool:
    a, b = domain_of(left), domain_of(right)
    return a is not None and b is not None and a != b


# -- settings helpers ---------------------------------------------------------------------------
def _settings(ctx: StepContext) -> AccountSettings:
    return ctx.settings.accounts


def _moves(ctx: StepContext) -> bool:
    chosen = ctx.run_params.entities if ctx.is_backfill else "both"
    return _settings(ctx).moves(ctx.direction) and chosen == "both"


def fields(ctx: StepContext) -> list[MappedField]:
    """The account fields written in this run's direction."""
    return [
        MappedField(key=f.dynamics365, field=f, rule=ctx.settings.conflict_rule_for(f))
        for f in _settings(ctx).field_mapping
        if f.direction.allows(ctx.direction)
    ]


def _dv_columns(ctx: StepContext) -> list[str]:
    mapped = [f.dynamics365 for f in _settings(ctx).field_mapping]
    return list(dict.fromkeys([PRIMARY_ID, *mapped, "websiteurl", "statecode", "modifiedon"]))


# -- reading ------------------------------------------------------------------------------------
def _dv_frame(ctx: StepContext, rows: list[dict[str, Any]]) -> pd.DataFrame:
    columns = _dv_columns(ctx)
    frame = pd.DataFrame(
        {
            "dataverse_id": [str(r[PRIMARY_ID]) for r in rows],
            **{c: [clean_text(r.get(c)) for r in rows] for c in columns if c != PRIMARY_ID},
        }
    )
    frame["dv_modified_at"] = pd.to_datetime(frame.get("modifiedon"), utc=True)
    return DV_ACCOUNTS.conform(frame)


def _dv_by_id(ctx: StepContext, ids: list[str], criteria: str | None = None) -> pd.DataFrame:
    """The Dynamics accounts of these ids (that match `criteria`, if given)."""
    wanted: list[object] = [uuid.UUID(str(v)) for v in dict.fromkeys(ids) if v]
    if not wanted:
        return _dv_frame(ctx, [])
    rows = ctx.dv_hook.find(
        ENTITY_SET, PRIMARY_ID, wanted, select=_dv_columns(ctx), filter=criteria
    )
    return _dv_frame(ctx, list(_configured(ctx, rows)))


def _dv_active(ctx: StepContext) -> pd.DataFrame:
    """Every active Dynamics account (5,000 a request), for matching names: compared here, as
    the match compares them (no name goes into a URL, nor into a log line)."""
    rows = ctx.dv_hook.query(ENTITY_SET, select=_dv_columns(ctx), filter="statecode eq 0")
    return _dv_frame(ctx, list(_configured(ctx, rows)))


def _configured(ctx: StepContext, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """`rows`, with Dataverse refusing the query (400) turned into the configuration error it
    is: a mapped account column the table lacks, or `accounts.record_criteria`."""
    try:
        yield from rows
    except ClientError as error:
        if error.status != 400:
            raise
        raise ConfigurationError(
            f"Dataverse refused the read of accounts ({error.message}). This is a configuration "
            "error: check accounts.field_mapping (columns the account table has, by logical "
            "name) and accounts.record_criteria in sync.yaml (docs/configuration.md)"
        ) from error


def _ac_accounts(ctx: StepContext) -> pd.DataFrame:
    """Every AC account: id, name, accountUrl, updated time."""
    rows = list(ctx.ac_hook.list_accounts())
    frame = pd.DataFrame(
        {
            "ac_id": [str(r["id"]) for r in rows],
            "name": [clean_text(r.get("name")) for r in rows],
            "accountUrl": [clean_text(r.get("accountUrl")) for r in rows],
            "ac_updated_at": [parse_ac_time(r.get("updatedTimestamp")) for r in rows],
        }
    )
    frame["ac_updated_at"] = pd.to_datetime(frame["ac_updated_at"], utc=True)
    return AC_ACCOUNTS.conform(frame)


# -- extract ------------------------------------------------------------------------------------
def extract(
    ctx: StepContext, started: datetime
) -> tuple[dict[str, int], dict[str, str | None], list[str]]:
    """Read the accounts this run looks at, both sides; stage them. Returns counts, the
    watermark to store after the load, and ["account"] when this is the first read."""
    if not _moves(ctx):
        return {}, {}, []
    cursor, read = common.stream_read(ctx, KIND, started)
    prefix = DV_KEY if ctx.direction is Direction.TO_ACTIVECAMPAIGN else AC_KEY
    retried = [
        e.record_key.removeprefix(prefix)
        for e in ctx.store.open_quarantine(ctx.direction)
        if e.record_key.startswith(prefix)
    ]
    label = "accounts read for the initial sync (first run)" if read.initial else None
    if ctx.direction is Direction.TO_ACTIVECAMPAIGN:
        criteria = _settings(ctx).record_criteria
        if read.since is None:
            rows = ctx.dv_hook.query(
                ENTITY_SET,
                select=_dv_columns(ctx),
                filter=criteria,
                orderby=f"modifiedon asc,{PRIMARY_ID} asc",
            )
        else:
            rows = ctx.dv_hook.modified_since(
                ENTITY_SET,
                read.since,
                select=_dv_columns(ctx),
                filter=criteria,
                primary_id=PRIMARY_ID,
            )
        changed = _dv_frame(ctx, list(_configured(ctx, rows)))
        # Quarantined accounts are read again, if they still match the criteria.
        again = _dv_by_id(ctx, retried, criteria)
        gone = [i for i in retried if i not in set(again["dataverse_id"])]
        dv = pd.concat([changed, again], ignore_index=True).drop_duplicates("dataverse_id")
        ac = _ac_accounts(ctx) if not dv.empty else AC_ACCOUNTS.empty()
        newest = changed["dv_modified_at"].max() if not changed.empty else None
        new, again = common.new_and_again(read, changed["dv_modified_at"])
        counts = {
            label or "accounts changed": len(changed) if label else new,
            "accounts read again (overlap window)": 0 if label else again,
            "AC accounts read": len(ac),
        }
    else:
        every = _ac_accounts(ctx)
        since = read.since
        changed_mask = (
            every["ac_updated_at"] >= pd.Timestamp(since)
            if since is not None
            else pd.Series(True, index=every.index)
        )
        ac = every[changed_mask | every["ac_id"].isin(retried)]
        gone = [i for i in retried if i not in set(every["ac_id"])]
        # The AC account of a Dynamics account deleted there is not sent back (whatever its
        # `on_delete` did with the link): Dynamics is not given back what it deleted.
        deleted = ctx.store.deleted_ac_ids(ac["ac_id"].tolist(), entities=(KIND,))
        if deleted:
            ac = ac[~ac["ac_id"].isin(deleted)]
            gone += [i for i in retried if i in deleted]
        links = ctx.store.object_links(KIND, ac_ids=ac["ac_id"].tolist())
        # A linked AC account whose fields are still those last synced (the sync's own write
        # coming back, or a change to an unmapped field) has nothing to send: not read further.
        agreed = {lk.ac_id for lk in links if _as_synced(ctx, ac, lk)} - set(retried)
        ac = ac[~ac["ac_id"].isin(agreed)]
        links = [lk for lk in links if lk.ac_id not in agreed]
        dv = _dv_by_id(ctx, [lk.dataverse_id for lk in links])
        if not ac["ac_id"].isin([lk.ac_id for lk in links]).all():
            # AC accounts with no link: matched by name against every active Dynamics account.
            dv = pd.concat([dv, _dv_active(ctx)], ignore_index=True).drop_duplicates("dataverse_id")
        newest = every.loc[changed_mask, "ac_updated_at"].max() if changed_mask.any() else None
        new, again = common.new_and_again(read, every.loc[changed_mask, "ac_updated_at"])
        counts = {
            label or "AC accounts changed": int(changed_mask.sum()) if label else new,
            "AC accounts read again (overlap window)": 0 if label else again,
            "Dynamics accounts read": len(dv),
        }
    # A quarantined account deleted since (or out of the criteria now) no longer waits.
    if gone and not ctx.dry_run:
        ctx.store.resolve([prefix + i for i in gone], ctx.direction)
        counts["accounts no longer waiting (deleted or out of the criteria)"] = len(gone)
    ctx.staging.write(DV_ACCOUNTS, dv)
    ctx.staging.write(AC_ACCOUNTS, ac)
    mark = newest.isoformat() if newest is not None and not pd.isna(newest) else None
    return counts, {cursor.name: mark}, [KIND] if read.initial else []


def _as_synced(ctx: StepContext, ac: pd.DataFrame, link: ObjectLink) -> bool:
    """Whether the AC account of `link` holds, in every field written towards Dynamics, the
    value last synced."""
    row = ac[ac["ac_id"] == link.ac_id]
    if row.empty:
        return False
    return all(
        (clean_text(row.iloc[0].get(m.field.activecampaign)) or "")
        == str(link.synced_values.get(m.key) or "")
        for m in fields(ctx)
    )


# -- plan (map_fields) --------------------------------------------------------------------------
def plan(ctx: StepContext) -> dict[str, int]:
    """Match, map and decide what to write for every account read; stage the plan."""
    if not _moves(ctx):
        return {}
    dv, ac = ctx.staging.read(DV_ACCOUNTS), ctx.staging.read(AC_ACCOUNTS)
    if (dv if ctx.direction is Direction.TO_ACTIVECAMPAIGN else ac).empty:
        ctx.staging.write(ACCOUNT_PLAN, ACCOUNT_PLAN.empty())
        return {}
    links = ctx.store.object_links(
        KIND, dataverse_ids=dv["dataverse_id"].tolist(), ac_ids=ac["ac_id"].tolist()
    )
    if ctx.direction is Direction.TO_ACTIVECAMPAIGN:
        pairs = pair_towards_ac(dv, ac, links)
    else:
        pairs = pair_towards_dynamics(dv, ac, links)
    writing = pairs["action"].isin([a.value for a in (*NEW_ACTIONS, *UPDATE_ACTIONS)])
    planned = _mapped(ctx, pairs[writing], dv, ac)
    refused = pairs[~writing]
    out = pd.concat([planned, refused], ignore_index=True)
    out = ACCOUNT_PLAN.conform(out.reindex(columns=list(OBJECT_PLAN_COLUMNS)))
    out["n_fields"] = out["n_fields"].fillna(0).astype("int64")
    out["unchanged"] = out["unchanged"].fillna(False).astype(bool)
    out["relink"] = out["relink"].fillna(False).astype(bool)
    quarantined = out[out["action"] == Action.QUARANTINE.value]
    common.quarantine_rows(
        ctx,
        quarantined,
        "map_fields",
        {r.record_key: [(r.reason, r.payload)] for r in quarantined.itertuples()},
    )
    ctx.staging.write(ACCOUNT_PLAN, out)
    return _counts(out)


def _counts(out: pd.DataFrame) -> dict[str, int]:
    writes = out[~out["unchanged"]]
    counts = {
        "accounts: create": int((writes["action"] == Action.NEW_ACCOUNT.value).sum()),
        "accounts: update": int((writes["action"] == Action.UPDATE_ACCOUNT.value).sum()),
        "accounts: unchanged": int(out["unchanged"].sum()),
    }
    for reason, n in (
        out.loc[out["action"] == Action.NOT_ELIGIBLE.value, "reason"].value_counts().items()
    ):
        counts[f"accounts not eligible: {reason}"] = int(n)
    return {k: v for k, v in counts.items() if v}


def _row(key: str, dataverse_id: Any, ac_id: Any, action: Action, reason: str | None = None,
         message: str | None = None, relink: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "record_key": key,
        "dataverse_id": dataverse_id,
        "ac_id": ac_id,
        "action": action.value,
        "reason": reason,
        "payload": message,
        "relink": relink,
    }


def pair_towards_ac(dv: pd.DataFrame, ac: pd.DataFrame, known: list[ObjectLink]) -> pd.DataFrame:
    """One row per Dynamics account read (`dv`): the AC account (of `ac`, every AC account) it
    goes to and the action, given the account links `known` of both."""
    links = {lk.dataverse_id: lk for lk in known}
    holders = {lk.ac_id: lk.dataverse_id for lk in known}
    ac_by_name: dict[str | None, list[tuple[str, Any]]] = {}
    for i, n, u in zip(ac["ac_id"], ac["name"], ac["accountUrl"], strict=True):
        ac_by_name.setdefault(name_key(n), []).append((i, u))
    present = set(ac["ac_id"])
    names = dv["name"].map(name_key)
    unlinked_names = names[~dv["dataverse_id"].isin(list(links))].value_counts()
    rows = []
    for row, key in zip(dv.to_dict("records"), names, strict=True):
        dvid = row["dataverse_id"]
        record = DV_KEY + dvid
        link = links.get(dvid)
        if link is not None:
            if link.ac_id in present:
                rows.append(_row(record, dvid, link.ac_id, Action.UPDATE_ACCOUNT))
            else:  # deleted in AC: created again, and linked anew
                rows.append(_row(record, dvid, link.ac_id, Action.NEW_ACCOUNT, reason="re-created"))
            continue
        if str(row.get("statecode") or "0") not in ("0", "0.0"):
            rows.append(_row(record, dvid, None, Action.NOT_ELIGIBLE, reason="inactive"))
            continue
        if key is None:  # no name: refused by validation, with the reason
            rows.append(_row(record, dvid, None, Action.NEW_ACCOUNT))
            continue
        if unlinked_names.get(key, 0) > 1:
            rows.append(_row(record, dvid, None, Action.QUARANTINE, Reason.DUPLICATE_ACCOUNT,
                             "another unlinked Dynamics account has the same name, and "
                             "ActiveCampaign account names are unique: rename or merge them in "
                             "Dynamics 365"))  # fmt: skip
            continue
        found = ac_by_name.get(key)
        if found is None:
            rows.append(_row(record, dvid, None, Action.NEW_ACCOUNT))
            continue
        if len(found) > 1:  # "Acme Corp" and "Acme  Corp": AC keeps both, the match cannot
            rows.append(_row(record, dvid, None, Action.QUARANTINE, Reason.DUPLICATE_ACCOUNT,
                             f"ActiveCampaign accounts {', '.join(sorted(i for i, _ in found))} "
                             "have this name but for case and spaces: which one it is cannot be "
                             "told; rename or merge them in ActiveCampaign"))  # fmt: skip
            continue
        ((ac_id, url),) = found
        holder = holders.get(ac_id)
        if holder is not None and holder != dvid:
            rows.append(_row(record, dvid, ac_id, Action.QUARANTINE, Reason.DUPLICATE_ACCOUNT,
                             f"ActiveCampaign account {ac_id} has this name and is linked to "
                             f"Dynamics account {holder}; AC account names are unique: rename "
                             "one of the two Dynamics accounts, or merge them"))  # fmt: skip
        elif _domains_differ(row.get("websiteurl"), url):
            rows.append(_row(record, dvid, ac_id, Action.QUARANTINE, Reason.ACCOUNT_NAME_TAKEN,
                             f"ActiveCampaign account {ac_id} has this name but another website "
                             "domain: it is another company, and AC account names are unique; "
                             "rename one of them"))  # fmt: skip
        else:
            rows.append(_row(record, dvid, ac_id, Action.UPDATE_ACCOUNT, relink=True))
    return pd.DataFrame(rows, columns=[*_row("", 0, 0, Action.NEW_ACCOUNT)])


def pair_towards_dynamics(
    dv: pd.DataFrame, ac: pd.DataFrame, known: list[ObjectLink]
) -> pd.DataFrame:
    """One row per AC account read (`ac`): the Dynamics account (of `dv`: the linked ones and
    those with its name) it goes to and the action, given the account links `known` of both."""
    links = {lk.ac_id: lk for lk in known}
    holders = {lk.dataverse_id for lk in known}
    present = set(dv["dataverse_id"])
    active = dv[dv["statecode"].fillna("0").astype(str).isin(["0", "0.0"])]
    by_name = active.assign(key=active["name"].map(name_key)).groupby("key")
    # AC keeps "Acme Corp" and "Acme  Corp" apart; the match cannot: such twins (unlinked)
    # do not take one Dynamics account between them.
    unlinked_keys = ac.loc[~ac["ac_id"].isin(list(links)), "name"].map(name_key)
    twins = {
        key: sorted(ac.loc[unlinked_keys[unlinked_keys == key].index, "ac_id"])
        for key, n in unlinked_keys.value_counts().items()
        if n > 1
    }
    rows = []
    for row in ac.to_dict("records"):
        ac_id = row["ac_id"]
        record = AC_KEY + ac_id
        link = links.get(ac_id)
        if link is not None:
            if link.dataverse_id in present:
                rows.append(_row(record, link.dataverse_id, ac_id, Action.UPDATE_ACCOUNT))
            else:
                rows.append(_row(record, link.dataverse_id, ac_id, Action.QUARANTINE,
                                 Reason.LINKED_RECORD_MISSING,
                                 f"its linked Dynamics account {link.dataverse_id} no longer "
                                 "exists (deleted or not readable): it is not created again; "
                                 "delete the AC account, or its link (runbook)"))  # fmt: skip
            continue
        key = name_key(row["name"])
        group = by_name.get_group(key) if key in by_name.groups else active.iloc[0:0]
        candidates = [
            i for i, url in zip(group["dataverse_id"], group["websiteurl"], strict=True)
            if i not in holders and not _domains_differ(url, row["accountUrl"])
        ]  # fmt: skip
        if candidates and key in twins:
            rows.append(_row(record, None, ac_id, Action.QUARANTINE, Reason.DUPLICATE_ACCOUNT,
                             f"ActiveCampaign accounts {', '.join(twins[key])} have this name "
                             "but for case and spaces, and Dynamics account "
                             f"{candidates[0]} too: which one it is cannot be told; rename or "
                             "merge them in ActiveCampaign"))  # fmt: skip
        elif len(candidates) > 1:
            rows.append(_row(record, None, ac_id, Action.QUARANTINE, Reason.DUPLICATE_ACCOUNT,
                             f"{len(candidates)} unlinked Dynamics accounts have its name "
                             f"({', '.join(sorted(candidates))}): which one it is cannot be "
                             "told; merge them, or give them their website"))  # fmt: skip
        elif candidates:
            rows.append(_row(record, candidates[0], ac_id, Action.UPDATE_ACCOUNT, relink=True))
        else:
            rows.append(_row(record, None, ac_id, Action.NEW_ACCOUNT))
    return pd.DataFrame(rows, columns=[*_row("", 0, 0, Action.NEW_ACCOUNT)])


def _mapped(
    ctx: StepContext, pairs: pd.DataFrame, dv: pd.DataFrame, ac: pd.DataFrame
) -> pd.DataFrame:
    """`plan_writes` over the pairs: payload (keyed by Dataverse column), synced values."""
    mapped = fields(ctx)
    if pairs.empty:
        return pairs.assign(n_fields=0, unchanged=False, synced_values="{}", source_hash=None)
    rows = pairs.copy()
    dv_index = dv.drop_duplicates("dataverse_id").set_index("dataverse_id")
    ac_index = ac.drop_duplicates("ac_id").set_index("ac_id")
    dv_ids, ac_ids = rows["dataverse_id"].astype(object), rows["ac_id"].astype(object)
    towards_ac = ctx.direction is Direction.TO_ACTIVECAMPAIGN
    for m in mapped:
        dv_values = common.lookup(dv_index[m.key], dv_ids) if m.key in dv_index else None
        ac_values = common.lookup(ac_index[m.field.activecampaign], ac_ids)
        rows[f"src:{m.key}"] = dv_values if towards_ac else ac_values
        rows[f"tgt:{m.key}"] = ac_values if towards_ac else dv_values
    dv_time = common.lookup(dv_index["dv_modified_at"], dv_ids)
    ac_time = common.lookup(ac_index["ac_updated_at"], ac_ids)
    rows["src_time"], rows["tgt_time"] = (dv_time, ac_time) if towards_ac else (ac_time, dv_time)
    rows.loc[rows["action"] == Action.NEW_ACCOUNT.value, "tgt_time"] = pd.NaT
    links = ctx.store.object_links(KIND, dataverse_ids=[i for i in dv_ids.dropna()])
    synced = {lk.dataverse_id: json.dumps(lk.synced_values) for lk in links}
    rows = pd.concat(
        [rows, expand_synced(dv_ids.map(lambda i: synced.get(i, "")), [m.key for m in mapped])],
        axis=1,
    )
    # A relink has no last-synced values: `plan_writes` keeps what each field's rule prefers.
    rows["relink"] = rows["relink"].fillna(False).astype(bool)
    out, _ = plan_writes(rows, mapped, direction=ctx.direction)
    out["unchanged"] = out["unchanged"] & ~out["relink"]
    out["source_hash"] = out["src_hash"]
    return out


# -- validate -----------------------------------------------------------------------------------
def validate(ctx: StepContext) -> tuple[dict[str, int], int]:
    """Check the accounts to write against the target's rules (a name; lengths); stage the
    valid ones. Returns counts and how many writes count for the mass-change breaker."""
    if not _moves(ctx):
        return {}, 0
    planned = ctx.staging.read(ACCOUNT_PLAN)
    writing = planned["action"].isin([Action.NEW_ACCOUNT.value, Action.UPDATE_ACCOUNT.value])
    to_write = planned[writing & ~planned["unchanged"]]
    failures: dict[str, list[tuple[str, str]]] = {}
    if not to_write.empty:
        payloads = [json.loads(p) for p in to_write["payload"]]
        frame = pd.DataFrame({"record_key": to_write["record_key"].to_numpy()})
        keys = [m.key for m in fields(ctx)]
        for key in keys:
            frame[key] = pd.array([p.get(key) for p in payloads], dtype="string")
        # The name is required where the write sets it (a new account, or an update that
        # changes or clears it); an update that leaves it alone is not checked for it.
        sets_name = (to_write["action"] == Action.NEW_ACCOUNT.value).to_numpy() | [
            "name" in p for p in payloads
        ]
        frame["name"] = frame["name"].where(pd.Series(sets_name), "(unchanged)")
        failures = validate_records(frame, _rules(ctx, keys)).failures
    common.quarantine_rows(ctx, to_write, "validate", failures)
    valid = planned[writing & ~planned["record_key"].isin(list(failures))]
    ctx.staging.write(ACCOUNT_VALID, valid)
    changing = valid[~valid["unchanged"]]
    counts = {"accounts valid": len(changing), "accounts quarantined": len(failures)}
    # The initial sync creates by design: its creates do not count towards the breaker.
    initial = set(ctx.staging.read_json("extract", "meta").get("initial_sync", []))
    if ctx.is_backfill or KIND in initial:
        changing = changing[changing["action"] == Action.UPDATE_ACCOUNT.value]
    return {k: v for k, v in counts.items() if v}, len(changing)


def _rules(ctx: StepContext, keys: list[str]) -> TargetRules:
    if ctx.direction is Direction.TO_ACTIVECAMPAIGN:
        return TargetRules(
            name="ActiveCampaign account",
            email_column=None,
            required=("name",),
            max_length={k: AC_MAX_LENGTH for k in keys},
        )
    info = ctx.dv_hook.check_columns(ENTITY_SET, keys)
    return TargetRules(
        name="Dynamics account",
        email_column=None,
        required=("name",),
        max_length={
            k: int(c.max_length) for k, c in info.columns.items() if k in keys and c.max_length
        },
        length_unit=UTF16,
    )


# -- load ---------------------------------------------------------------------------------------
def planned(ctx: StepContext) -> dict[str, int]:
    """A dry run's plan for accounts."""
    if not _moves(ctx):
        return {}
    valid = ctx.staging.read(ACCOUNT_VALID)
    return {f"{k} (planned)": v for k, v in _counts(valid).items()}


def load(ctx: StepContext) -> dict[str, int]:
    """Write the valid accounts, each linked as soon as it is written. A refused write
    quarantines its account; the others go on. The links are read again first: what an earlier
    attempt of this load (a retried task) or an overlapping run wrote is not written twice."""
    if not _moves(ctx):
        return {}
    valid = ctx.staging.read(ACCOUNT_VALID)
    counts: dict[str, int] = {}
    links: list[ObjectLink] = []
    failures: dict[str, list[tuple[str, str]]] = {}
    towards_ac = ctx.direction is Direction.TO_ACTIVECAMPAIGN
    source = "dataverse_id" if towards_ac else "ac_id"
    known = ctx.store.object_links(
        KIND,
        **{("dataverse_ids" if towards_ac else "ac_ids"): [str(i) for i in valid[source].dropna()]},
    )
    now = {(lk.dataverse_id if towards_ac else lk.ac_id): lk for lk in known}
    for row in valid.to_dict("records"):
        synced = json.loads(row["synced_values"] or "{}")
        if row["unchanged"]:
            previous = now.get(str(row[source])) if pd.notna(row[source]) else None
            links.append(_link(ctx, row, row["dataverse_id"], row["ac_id"], synced, previous))
            continue
        link = now.get(str(row[source])) if pd.notna(row[source]) else None
        if row["reason"] == "re-created" and link is not None and link.ac_id == row["ac_id"]:
            link = None  # the link of the AC account deleted there, as the plan saw it
        if link is not None and link.synced_values == synced:
            ctx.store.resolve([row["record_key"]], ctx.direction)
            counts["accounts already written (an earlier attempt)"] = (
                counts.get("accounts already written (an earlier attempt)", 0) + 1
            )
            continue
        if link is not None and row["action"] == Action.NEW_ACCOUNT.value:
            # Created by an earlier attempt whose values since changed: an update of it.
            row = {**row, "action": Action.UPDATE_ACCOUNT.value, "reason": None,
                   "dataverse_id": link.dataverse_id, "ac_id": link.ac_id}  # fmt: skip
        try:
            dataverse_id, ac_id, what = _write(ctx, row)
        except ClientError as error:
            code = (
                Reason.ACCOUNT_NAME_TAKEN if error.code == "duplicate" else Reason.TARGET_REJECTED
            )
            failures[row["record_key"]] = [
                (code, f"{ctx.direction.target.value} refused the account: {error.status} "
                       f"{error.code or ''} {error.message}".replace("  ", " "))
            ]  # fmt: skip
            continue
        refused = ctx.store.save_object_links([_link(ctx, row, dataverse_id, ac_id, synced, link)])
        if refused:
            failures[row["record_key"]] = [
                (Reason.DUPLICATE_ACCOUNT, "written, but another account's link holds its "
                 "counterpart: the link was not moved; see which account this is")
            ]  # fmt: skip
            continue
        ctx.store.resolve([row["record_key"]], ctx.direction)
        counts[what] = counts.get(what, 0) + 1
    ctx.store.save_object_links(links)
    ctx.store.resolve([r for r in valid.loc[valid["unchanged"], "record_key"]], ctx.direction)
    if links:
        counts["accounts unchanged"] = len(links)
    if failures:
        common.quarantine_rows(ctx, valid, "load", failures)
        counts["accounts refused by the target"] = len(failures)
    return counts


def _link(
    ctx: StepContext,
    row: dict[str, Any],
    dataverse_id: Any,
    ac_id: Any,
    synced: dict[str, Any],
    previous: ObjectLink | None,
) -> ObjectLink:
    """The link after a write: its origin is where the account was first created (kept from
    the link before; a new one: this run's source; one matched by name: Dynamics)."""
    if previous is not None:
        origin = previous.origin
    elif row["action"] == Action.NEW_ACCOUNT.value or str(dataverse_id) == _made_from(ctx, ac_id):
        # (matched by name to the account an interrupted load made from this AC account)
        origin = ctx.direction.source.value
    else:
        origin = System.DYNAMICS365.value
    return ObjectLink(KIND, str(dataverse_id), str(ac_id), origin, synced)


def _write(ctx: StepContext, row: dict[str, Any]) -> tuple[str, str, str]:
    """Create or update one account on the target; returns both ids and what was done."""
    payload = json.loads(row["payload"] or "{}")
    new = row["action"] == Action.NEW_ACCOUNT.value
    if ctx.direction is Direction.TO_ACTIVECAMPAIGN:
        attributes = {
            m.field.activecampaign: payload[m.key] for m in fields(ctx) if m.key in payload
        }
        if not new:
            if attributes:
                try:
                    ctx.ac_hook.update_account(row["ac_id"], **attributes)
                except NotFoundError:  # deleted in AC since the read: created again
                    new = True
            if not new:
                return (
                    row["dataverse_id"],
                    row["ac_id"],
                    ("AC accounts updated" if attributes else "accounts linked (by name)"),
                )
        full = {**_source_values(ctx, row["dataverse_id"]), **attributes}
        try:
            created = ctx.ac_hook.create_account(
                str(full.get("name")), account_url=full.get("accountUrl")
            )
        except ClientError as error:
            mine = _created_before(ctx, full) if error.code == "duplicate" else None
            if mine is None:
                raise
            return row["dataverse_id"], mine, "accounts linked after an interrupted load"
        what = "AC accounts re-created" if row["reason"] == "re-created" else "AC accounts created"
        return row["dataverse_id"], str(created["id"]), what
    values = {k: v for k, v in payload.items() if k in {m.key for m in fields(ctx)}}
    if new:
        return (
            _create_in_dynamics(ctx, row["ac_id"], values),
            row["ac_id"],
            ("Dynamics accounts created"),
        )
    if values:
        ctx.dv_hook.update_record(ENTITY_SET, row["dataverse_id"], values)
    what = "Dynamics accounts updated" if values else "accounts linked (by name)"
    return row["dataverse_id"], row["ac_id"], what


def _made_from(ctx: StepContext, ac_id: Any) -> str | None:
    """The id a Dynamics account created from this AC account gets (towards Dynamics only)."""
    if ctx.direction is not Direction.TO_DYNAMICS365 or ac_id is None or pd.isna(ac_id):
        return None
    ctx.ac_hook.get_conn()  # the AC account's URL needs the connection's host
    return str(uuid.uuid5(DYNAMICS_IDS, f"{ctx.ac_hook.base_url}/accounts/{ac_id}"))


def _created_before(ctx: StepContext, full: dict[str, Any]) -> str | None:
    """The AC account that took the name of an account this load is creating, when it is that
    account: created by an earlier attempt whose answer or link was lost (no other link holds
    it, and its website's domain agrees). It is given the values and its id returned."""
    found = ctx.ac_hook.find_account(str(full.get("name")))
    if found is None or _domains_differ(found.get("accountUrl"), full.get("accountUrl")):
        return None
    if ctx.store.object_links(KIND, ac_ids=[str(found["id"])]):
        return None
    if (found.get("accountUrl") or None) != (full.get("accountUrl") or None):
        ctx.ac_hook.update_account(found["id"], accountUrl=full.get("accountUrl"))
    return str(found["id"])


def _create_in_dynamics(ctx: StepContext, ac_id: str, values: dict[str, Any]) -> str:
    """Create the Dynamics account of an AC account, with an id made from the AC account's
    (`DYNAMICS_IDS`): an attempt that died between the create and the link is followed by a
    create of the same id, which Dataverse refuses as existing (412): it is updated instead."""
    account_id = _made_from(ctx, ac_id)
    assert account_id is not None  # towards Dynamics, of an AC account
    try:
        return ctx.dv_hook.create_record(ENTITY_SET, {**values, PRIMARY_ID: account_id})
    except ClientError as error:
        if error.status != 412:
            raise
    ctx.dv_hook.update_record(ENTITY_SET, account_id, values)
    return account_id


def _source_values(ctx: StepContext, dataverse_id: str) -> dict[str, Any]:
    """The AC attributes of a Dynamics account as read (an AC account created again after it
    was deleted there gets all of them, not only the fields that changed)."""
    dv = ctx.staging.read(DV_ACCOUNTS)
    row = dv[dv["dataverse_id"] == dataverse_id]
    if row.empty:
        return {}
    return {
        m.field.activecampaign: clean_text(row.iloc[0].get(m.key))
        for m in fields(ctx)
        if clean_text(row.iloc[0].get(m.key))
    }


# -- contacts on their account ------------------------------------------------------------------
ASSOCIATE_ALL_ABOVE = 20  # more contacts than this: read every AC association (100 a request)
# What an association write may meet and leave for the next run (the contact's entry in the
# quarantine, tried again every run); a configuration error fails the run, as everywhere.
PASSING = (ClientError, ServerError, RateLimitError, ApiConnectionError)
DV_ASSOCIATION = "account_contact:"  # quarantine keys: account_contact:<contactid> (towards AC)
AC_ASSOCIATION = "ac_account_contact:"  # ac_account_contact:<AC contact id> (towards Dynamics)


@dataclass(frozen=True)
class Move:
    """One contact to put on an account (or take off one) on the target side."""

    contact: str  # the Dynamics contact id
    ac_contact: str
    ac_account: str  # the AC account it ends on ("" for none): stored as the last synced
    target: str  # what the target is given: an AC account id, a Dynamics account id, or ""
    first: bool = False  # the contact's first association: never synced before


def associate(ctx: StepContext) -> dict[str, int]:
    """After the load: put the contacts this run read on their account on the target side,
    where the source changed the association since it was last synced (both changed: Dynamics
    wins, it is the system of record). The moves count towards the mass-change breaker; one
    the target refuses is quarantined and tried again next run, the others go on."""
    if not (_moves(ctx) and _settings(ctx).associate_contacts):
        return {}
    towards_ac = ctx.direction is Direction.TO_ACTIVECAMPAIGN
    prefix = DV_ASSOCIATION if towards_ac else AC_ASSOCIATION
    waiting = [
        e.record_key.removeprefix(prefix)
        for e in ctx.store.open_quarantine(ctx.direction)
        if e.record_key.startswith(prefix)
    ]
    if towards_ac:
        moves = _moves_in_ac(ctx, _contacts_read_in_dynamics(ctx, waiting))
    else:
        moves = _moves_in_dynamics(ctx, _contacts_read_in_ac(ctx, waiting))
    if not moves:
        return {}
    # Changing associations synced before counts; a contact's first one counts as a create
    # (not in the initial sync, where they come by design).
    initial = set(ctx.staging.read_json("extract", "meta").get("initial_sync", []))
    counted = [m for m in moves if not (m.first and (ctx.is_backfill or initial))]
    if counted:
        common.check_mass_change(
            ctx,
            len(counted),
            written="The run's contacts and accounts were written, none of these associations.",
        )
    done, failures = _apply_moves(ctx, moves)
    keys = {m.contact: prefix + (m.contact if towards_ac else m.ac_contact) for m in moves}
    ctx.store.resolve([keys[m.contact] for m in done], ctx.direction)
    if failures:
        ctx.store.quarantine(
            [
                (
                    keys[m.contact],
                    ctx.direction.value,
                    "load",
                    Reason.TARGET_REJECTED.value,
                    f"the contact could not be put on its account: {why}",
                    None,
                )
                for m, why in failures
            ],
            ctx.run_id,
        )
    counts = {
        "contacts put on their AC account"
        if towards_ac
        else "contacts put on their Dynamics account": sum(bool(m.target) for m in done),
        "contacts taken off their AC account": sum(not m.target for m in done),
        "contact associations refused (quarantined)": len(failures),
    }
    return {k: v for k, v in counts.items() if v}


def _apply_moves(ctx: StepContext, moves: list[Move]) -> tuple[list[Move], list[tuple[Move, str]]]:
    """Write each move; the ones done, and the ones refused with why."""
    towards_ac = ctx.direction is Direction.TO_ACTIVECAMPAIGN
    current = _ac_account_of(ctx, [m.ac_contact for m in moves]) if towards_ac else {}
    done: list[Move] = []
    failures: list[tuple[Move, str]] = []
    for move in moves:
        try:
            if towards_ac:
                _move_in_ac(ctx, move, current.get(move.ac_contact))
            else:
                bind = {"parentcustomerid_account@odata.bind": f"/accounts({move.target})"}
                ctx.dv_hook.update_record("contacts", move.contact, bind)
        except PASSING as error:
            log.warning(
                "contact %s not put on its account (%s %s): tried again next run",
                move.contact,
                error.status,
                error.code or "",
            )
            failures.append((move, f"{error.status} {error.code or ''} {error.message}"))
            continue
        # Stored at once: a worker that dies after this write leaves it recorded, so a retry
        # does not take the sync's own write for a change made in Dynamics.
        _record_association(ctx, move)
        done.append(move)
    return done, failures


def _record_association(ctx: StepContext, move: Move) -> None:
    link = ObjectLink(
        ASSOCIATION,
        move.contact,
        move.ac_contact,
        ctx.direction.source.value,
        {"account": move.ac_account},
    )
    ctx.store.save_object_links([link])


def _move_in_ac(ctx: StepContext, move: Move, current: tuple[str, str] | None) -> None:
    hook = ctx.ac_hook
    if current is None:
        if move.target:
            hook.associate_contact(move.target, move.ac_contact)
    elif move.target and current[1] != move.target:
        hook.update_account_contact(current[0], account_id=move.target)
    elif not move.target:
        hook.remove_account_contact(current[0])


def _contacts_read_in_dynamics(ctx: StepContext, waiting: list[str]) -> pd.DataFrame:
    """The linked contacts this run read, those of the accounts it linked, and those whose
    association waits in the quarantine: `dataverse_id`, `_parentcustomerid_value`."""
    parent = "_parentcustomerid_value"
    if parent in ctx.staging.columns(DV_CHANGED):
        read = ctx.staging.read_columns(DV_CHANGED, ["dataverse_id", parent], entity="contact")
    else:
        read = pd.DataFrame(columns=["dataverse_id", parent])
    valid = ctx.staging.read(ACCOUNT_VALID)
    linked_now = valid.loc[
        (valid["action"] == Action.NEW_ACCOUNT.value) | valid["relink"], "dataverse_id"
    ].dropna()
    links = {lk.dataverse_id for lk in ctx.store.object_links(KIND, dataverse_ids=linked_now)}
    more: list[dict[str, Any]] = []
    if links:
        more += ctx.dv_hook.find(
            "contacts",
            parent,
            [uuid.UUID(i) for i in links],
            select=["contactid", parent],
            filter="statecode eq 0",
        )
    if waiting:
        more += ctx.dv_hook.find(
            "contacts", "contactid", [uuid.UUID(i) for i in waiting], select=["contactid", parent]
        )
    if more:
        members = pd.DataFrame(
            [{"dataverse_id": str(r["contactid"]), parent: r.get(parent)} for r in more],
            columns=["dataverse_id", parent],
        )
        read = pd.concat([read, members], ignore_index=True).drop_duplicates("dataverse_id")
    linked = ctx.store.linked_dataverse_ids("contact", read["dataverse_id"].astype(str))
    return read[read["dataverse_id"].isin(linked)]


def _contacts_read_in_ac(ctx: StepContext, waiting: list[str]) -> pd.DataFrame:
    """The linked contacts this run read in AC (written or unchanged), and those whose
    association waits in the quarantine: `dataverse_id`, `ac_contact_id`."""
    mapped = ctx.staging.read(AC_MAPPED)
    ac_ids = mapped.loc[mapped["entity"] == "contact", "ac_id"].dropna().astype(str).tolist()
    links = [lk for lk in ctx.store.links_for(ac_ids=ac_ids + waiting) if lk.entity == "contact"]
    return pd.DataFrame(
        {
            "dataverse_id": [lk.dataverse_id for lk in links],
            "ac_contact_id": [lk.ac_contact_id for lk in links],
        },
        columns=["dataverse_id", "ac_contact_id"],
    )


def _stored(ctx: StepContext, dataverse_ids: list[str]) -> dict[str, str]:
    """The AC account each contact was last put on ("" for none), by Dynamics contact id."""
    return {
        lk.dataverse_id: str(lk.synced_values.get("account") or "")
        for lk in ctx.store.object_links(ASSOCIATION, dataverse_ids=dataverse_ids)
    }


def _ac_account_of(ctx: StepContext, ac_contact_ids: list[str]) -> dict[str, tuple[str, str]]:
    """AC contact id -> (association id, AC account id) of its account, if any."""
    hook = ctx.ac_hook
    if len(ac_contact_ids) > ASSOCIATE_ALL_ABOVE:
        rows = list(hook.list_account_contacts())
    else:
        rows = [r for c in ac_contact_ids for r in hook.list_account_contacts(contact_id=c)]
    wanted = set(ac_contact_ids)
    return {r["contact"]: (r["id"], r["account"]) for r in rows if r["contact"] in wanted}


def _moves_in_ac(ctx: StepContext, contacts: pd.DataFrame) -> list[Move]:
    """Where Dynamics changed a contact's company since it was last synced (or it was never
    synced and Dynamics names a linked account): the AC account to put its AC contact on. An
    account not linked yet is looked at again when the contact is read next."""
    if contacts.empty:
        return []
    parents = contacts.set_index("dataverse_id")["_parentcustomerid_value"].astype(object)
    accounts = {
        lk.dataverse_id: lk.ac_id
        for lk in ctx.store.object_links(KIND, dataverse_ids=parents.dropna().astype(str))
    }
    stored = _stored(ctx, list(parents.index))
    wanted = {
        dvid: accounts.get(str(parent), "") if pd.notna(parent) else ""
        for dvid, parent in parents.items()
    }
    changed = {
        dvid: account
        for dvid, account in wanted.items()
        if account != stored.get(dvid, "") and (account or dvid in stored)
    }
    if not changed:
        return []
    # The AC contacts (a link a bulk import wrote has no AC id yet: found by its email).
    contact_links = {
        lk.dataverse_id: lk
        for lk in ctx.store.links_for(dataverse_ids=list(changed))
        if lk.entity == "contact"
    }
    moves, learned = [], {}
    for dvid, link in contact_links.items():
        ac_contact = activecampaign.contact_id_of(ctx.ac_hook, link.ac_contact_id, link.email)
        if ac_contact is None:
            continue
        first = dvid not in stored
        moves.append(Move(dvid, str(ac_contact), changed[dvid], changed[dvid], first))
        if link.ac_contact_id is None:
            learned[str(ac_contact)] = link
    # Remembered in the links, so the deals of this run and later runs need not look again
    # (an id another link holds stays with it).
    taken = {lk.ac_contact_id for lk in ctx.store.links_for(ac_ids=list(learned))}
    ctx.store.save_links(
        [replace(link, ac_contact_id=i) for i, link in learned.items() if i not in taken]
    )
    return moves


def _moves_in_dynamics(ctx: StepContext, contacts: pd.DataFrame) -> list[Move]:
    """Where AC put a contact on another linked account than the one last synced, and Dynamics
    did not change its company since (then Dynamics wins): the Dynamics account to set. Taking
    a contact off its AC account does not clear its company in Dynamics."""
    if contacts.empty:
        return []
    by_ac = dict(zip(contacts["ac_contact_id"].astype(str), contacts["dataverse_id"], strict=True))
    current = {c: account for c, (_, account) in _ac_account_of(ctx, list(by_ac)).items()}
    stored = _stored(ctx, list(by_ac.values()))
    accounts = {
        lk.ac_id: lk.dataverse_id
        for lk in ctx.store.object_links(
            KIND, ac_ids=list({*current.values(), *filter(None, stored.values())})
        )
    }
    changed = {
        by_ac[c]: (c, account)
        for c, account in current.items()
        if account in accounts and account != stored.get(by_ac[c], "")
    }
    if not changed:
        return []
    rows = ctx.dv_hook.find(
        "contacts",
        "contactid",
        [uuid.UUID(d) for d in changed],
        select=["contactid", "_parentcustomerid_value"],
    )
    parent = {str(r["contactid"]): str(r.get("_parentcustomerid_value") or "") for r in rows}
    moves = []
    for dvid, (ac_contact, ac_account) in changed.items():
        if dvid not in parent:
            continue
        if parent[dvid] == accounts[ac_account]:
            # Both sides agree already (this sync's own write, its record lost to a crash; or
            # the same move made on both sides): recorded, nothing written.
            _record_association(
                ctx, Move(dvid, ac_contact, ac_account, accounts[ac_account], dvid not in stored)
            )
            continue
        synced_company = accounts.get(stored.get(dvid, ""), "")
        # Dynamics changed it too since the last sync (or, never synced, names a company):
        # Dynamics wins, and dynamics365_to_activecampaign carries its choice to AC.
        if parent[dvid] != synced_company and (dvid in stored or parent[dvid]):
            continue
        moves.append(Move(dvid, ac_contact, ac_account, accounts[ac_account], dvid not in stored))
    return moves
