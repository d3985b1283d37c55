"""Opportunities -> deals (`crm_sync.flows.deals`), the pure parts: the mapping (value in cents,
status, stage, owner), who the deal is with, echo suppression, and what AC would refuse."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest
from crm_sync.flows.deals import (
    KIND,
    MAX_CENTS,
    Parties,
    cents,
    changed_fields,
    check_deals,
    deal_status,
    deal_values,
    opportunity_frame,
    parties_of,
    plan_counts,
    plan_deals,
)
from crm_sync.records import Action
from crm_sync.settings import OpportunitySettings
from crm_sync.state import ObjectLink, content_hash
from hypothesis import given, settings
from hypothesis import strategies as st

OWNER = "6f1c2d3e-0000-4000-8000-000000000001"
SETTINGS = OpportunitySettings(
    enabled=True,
    pipeline="Sales",
    currency="eur",
    stages={"qualify": "Lead in", "develop": "Talks", "propose": "Offer", "close": "Signing"},
    owner_default="1",
    owners={OWNER: "4"},
)
CONTACTS = {"c1": "11", "c2": "12"}  # linked Dynamics contacts -> AC contact ids
ACCOUNTS = {"a1": "21"}  # linked Dynamics accounts -> AC account ids


def frame(*rows: dict[str, Any]) -> pd.DataFrame:
    """An extract frame of opportunities o0, o1, ... (unset columns empty)."""
    columns = ["name", "description", "estimatedvalue", "salesstage", "statecode", "owner_id"]
    columns += ["contact_dv", "account_dv", "primary_contact_dv"]
    return pd.DataFrame(
        [
            {"dataverse_id": f"o{i}", **{c: None for c in columns}, **row}
            for i, row in enumerate(rows)
        ]
    )


def cells(values: Any) -> list[Any]:
    """A frame's or series' values, an empty cell as None (pandas gives NaN or None)."""
    items = values if isinstance(values, list) else values.tolist()
    return [cells(v) if isinstance(v, list) else (None if pd.isna(v) else v) for v in items]


def parties(opportunities: pd.DataFrame) -> dict[str, Parties]:
    return {
        row["dataverse_id"]: parties_of(row, CONTACTS, ACCOUNTS)
        for row in opportunities.to_dict("records")
    }


def linked(plan: pd.DataFrame) -> dict[str, ObjectLink]:
    """The links a load saves for the deals it wrote: what it wrote."""
    written = plan[plan["action"].isin([Action.NEW_DEAL.value, Action.UPDATE_DEAL.value])]
    written = written[written["reason"].isna()]
    return {
        str(r.dataverse_id): ObjectLink(KIND, str(r.dataverse_id), str(i), "dynamics365",
                                        json.loads(r.synced_values))
        for i, r in enumerate(written.itertuples())
    }  # fmt: skip


# -- value, status, stage, owner ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        (1234.56, 123456),
        (19.99, 1999),
        (99, 9900),
        (0.005, 1),  # half a cent goes up
        (0.0049, 0),
        (-0.005, -1),  # and away from zero below it
        (1e12, MAX_CENTS),
        (None, 0),
        (float("nan"), 0),
    ],
)
def test_a_money_amount_in_cents(amount: Any, expected: int) -> None:
    assert cents(amount) == expected


@given(st.integers(-MAX_CENTS, MAX_CENTS))
def test_cents_round_trip_every_money_value_dataverse_holds(amount_in_cents: int) -> None:
    """Every amount of Dataverse's Money range (2 decimals), as its JSON number arrives."""
    amount = json.loads(json.dumps(amount_in_cents / 100))
    assert cents(amount) == amount_in_cents


@pytest.mark.parametrize(
    ("statecode", "status"),
    [(0, 0), (1, 1), (2, 2), (1.0, 1), (None, 0), (float("nan"), 0), (3, 0), ("2", 2)],
)
def test_won_and_lost_opportunities_are_won_and_lost_deals(statecode: Any, status: int) -> None:
    assert deal_status(statecode) == status


def test_a_deal_takes_the_opportunitys_topic_value_stage_status_and_owner() -> None:
    (row,) = frame(
        {
            "name": " Renewal\t2025 ",
            "description": "Line one\nLine two",
            "estimatedvalue": 1234.5,
            "salesstage": 2,
            "statecode": 1,
            "owner_id": OWNER.upper(),
        }
    ).to_dict("records")
    assert deal_values(row, SETTINGS) == {
        "title": "Renewal 2025",
        "value": 123450,
        "currency": "eur",
        "pipeline": "Sales",
        "stage": "Offer",
        "status": 1,
        "owner": "4",
        "description": "Line one\nLine two",
    }


@pytest.mark.parametrize(
    ("salesstage", "stage"),
    [(0, "Lead in"), (1, "Talks"), (3.0, "Signing"), (None, "Lead in"), (7, "Lead in")],
)
def test_the_sales_stage_picks_the_stage_sync_yaml_names(salesstage: Any, stage: str) -> None:
    (row,) = frame({"salesstage": salesstage}).to_dict("records")
    assert deal_values(row, SETTINGS)["stage"] == stage


@pytest.mark.parametrize(("owner", "ac_user"), [(OWNER, "4"), ("someone-else", "1"), (None, "1")])
def test_an_unmapped_or_missing_owner_is_the_default_user(owner: str | None, ac_user: str) -> None:
    (row,) = frame({"owner_id": owner}).to_dict("records")
    assert deal_values(row, SETTINGS)["owner"] == ac_user


def test_an_empty_opportunity_is_an_untitled_open_deal_worth_nothing() -> None:
    (row,) = frame({}).to_dict("records")
    values = deal_values(row, SETTINGS)
    assert (values["title"], values["value"], values["status"], values["description"]) == (
        None,
        0,
        0,
        "",
    )


# -- who the deal is with -----------------------------------------------------------------------
def test_the_customer_is_the_account_when_it_is_one_and_the_contact_otherwise() -> None:
    rows = [
        {"opportunityid": "o1", "_customerid_value": "a1"},
        {"opportunityid": "o2", "_customerid_value": "c1"},
        {"opportunityid": "o3", "_customerid_value": "c1", "_parentaccountid_value": "a2"},
        {"opportunityid": "o4", "_customerid_value": "a1", "_parentcontactid_value": "c2"},
    ]
    out = opportunity_frame(rows, {"a1": "c9", "a2": None})
    assert cells(out[["contact_dv", "account_dv", "primary_contact_dv"]].values) == [
        [None, "a1", "c9"],
        ["c1", None, None],
        ["c1", "a2", None],
        ["c2", "a1", "c9"],
    ]
    assert out["record_key"].tolist() == ["opportunity:o1", "opportunity:o2", "opportunity:o3",
                                          "opportunity:o4"]  # fmt: skip


@pytest.mark.parametrize(
    ("refs", "contact", "account"),
    [
        ({"contact_dv": "c1", "account_dv": "a1", "primary_contact_dv": "c2"}, "11", "21"),
        ({"contact_dv": "c7", "account_dv": "a1", "primary_contact_dv": "c2"}, "12", "21"),
        ({"account_dv": "a1"}, None, "21"),
        ({"contact_dv": "c1", "account_dv": "a7"}, "11", None),
    ],
)
def test_the_contact_comes_first_then_the_accounts_primary_contact(
    refs: dict[str, str], contact: str | None, account: str | None
) -> None:
    assert parties_of(refs, CONTACTS, ACCOUNTS) == Parties(contact, account)


def test_with_nobody_linked_the_reason_names_what_is_missing() -> None:
    found = parties_of(
        {"contact_dv": "c7", "account_dv": "a7", "primary_contact_dv": "c8"}, CONTACTS, ACCOUNTS
    )
    assert (found.contact, found.account) == (None, None)
    assert found.missing == (
        "its contact c7 is not linked to an ActiveCampaign contact yet; its account a7 is not "
        "linked to an ActiveCampaign account yet; nor is the account's primary contact c8: it "
        "syncs once one of them has synced"
    )
    assert "names no contact and no account" in str(parties_of({}, CONTACTS, ACCOUNTS).missing)


# -- the plan and echo suppression --------------------------------------------------------------
def test_a_new_opportunity_creates_its_deal_and_one_with_nobody_waits() -> None:
    opportunities = frame({"name": "A", "contact_dv": "c1"}, {"name": "B", "contact_dv": "c7"})
    plan = plan_deals(opportunities, SETTINGS, {}, parties(opportunities))
    assert plan["action"].tolist() == [Action.NEW_DEAL.value, Action.NEW_DEAL.value]
    assert cells(plan["reason"]) == [None, "no_deal_contact"]
    assert json.loads(plan.loc[0, "payload"])["contact"] == "11"
    assert plan_counts(plan) == {
        "deals: create": 1,
        "deals: waiting for a linked contact or account": 1,
    }


def test_only_the_fields_changed_since_the_last_write_are_written() -> None:
    opportunities = frame({"name": "A", "contact_dv": "c1", "estimatedvalue": 10})
    links = linked(plan_deals(opportunities, SETTINGS, {}, parties(opportunities)))
    opportunities.loc[0, "name"] = "A, renamed"
    again = plan_deals(opportunities, SETTINGS, links, parties(opportunities))
    assert again.loc[0, "action"] == Action.UPDATE_DEAL.value
    assert json.loads(again.loc[0, "payload"]) == {"title": "A, renamed"}
    assert json.loads(again.loc[0, "synced_values"])["value"] == 1000
    assert plan_counts(again) == {"deals: update": 1}


def test_a_deal_whose_parties_are_no_longer_linked_keeps_the_ones_written() -> None:
    opportunities = frame({"name": "A", "contact_dv": "c1"})
    links = linked(plan_deals(opportunities, SETTINGS, {}, parties(opportunities)))
    opportunities.loc[0, "contact_dv"] = "c7"  # moved to a contact not synced yet
    again = plan_deals(opportunities, SETTINGS, links, parties(opportunities))
    assert bool(again.loc[0, "unchanged"]) and again.loc[0, "payload"] == "{}"


def test_a_changed_setting_is_a_change_to_write() -> None:
    opportunities = frame({"name": "A", "contact_dv": "c1", "salesstage": 1})
    links = linked(plan_deals(opportunities, SETTINGS, {}, parties(opportunities)))
    renamed = SETTINGS.model_copy(update={"stages": {**SETTINGS.stages, "develop": "Talking"}})
    again = plan_deals(opportunities, renamed, links, parties(opportunities))
    assert json.loads(again.loc[0, "payload"]) == {"stage": "Talking"}


def test_a_quarantined_opportunity_waits_for_a_change_unless_it_waits_for_its_contact() -> None:
    opportunities = frame({"name": "A", "contact_dv": "c1"}, {"name": "B", "contact_dv": "c7"})
    first = plan_deals(opportunities, SETTINGS, {}, parties(opportunities))
    hashes = dict(zip(first["record_key"], first["source_hash"], strict=True))
    quarantined = {
        "opportunity:o0": (hashes["opportunity:o0"], "target_rejected"),
        "opportunity:o1": (hashes["opportunity:o1"], "no_deal_contact"),
    }
    again = plan_deals(opportunities, SETTINGS, {}, parties(opportunities), quarantined)
    assert again["action"].tolist() == [Action.NOT_ELIGIBLE.value, Action.NEW_DEAL.value]
    assert plan_counts(again)["deals not eligible: still_quarantined"] == 1
    opportunities.loc[0, "name"] = "A, fixed"
    fixed = plan_deals(opportunities, SETTINGS, {}, parties(opportunities), quarantined)
    assert fixed.loc[0, "action"] == Action.NEW_DEAL.value


OPPORTUNITY = st.fixed_dictionaries(
    {
        "name": st.one_of(st.none(), st.text(max_size=30)),
        "description": st.one_of(st.none(), st.text(max_size=30)),
        "estimatedvalue": st.one_of(st.none(), st.integers(0, MAX_CENTS).map(lambda c: c / 100)),
        "salesstage": st.one_of(st.none(), st.integers(0, 3)),
        "statecode": st.sampled_from([0, 1, 2]),
        "owner_id": st.sampled_from([None, OWNER, "someone-else"]),
        "contact_dv": st.sampled_from([None, "c1", "c2", "c7"]),
        "account_dv": st.sampled_from([None, "a1", "a7"]),
        "primary_contact_dv": st.sampled_from([None, "c2", "c8"]),
    }
)


@settings(max_examples=200, deadline=None)
@given(st.lists(OPPORTUNITY, max_size=6))
def test_a_second_plan_over_the_same_rows_writes_nothing(rows: list[dict[str, Any]]) -> None:
    opportunities = frame(*rows)
    first = plan_deals(opportunities, SETTINGS, {}, parties(opportunities))
    links = linked(first)
    again = plan_deals(opportunities, SETTINGS, links, parties(opportunities))
    for row in again.to_dict("records"):
        if row["dataverse_id"] in links:
            assert row["action"] == Action.UPDATE_DEAL.value
            assert row["unchanged"] and row["payload"] == "{}" and row["n_fields"] == 0
            assert json.loads(row["synced_values"]) == links[row["dataverse_id"]].synced_values
        else:  # nobody linked: it still waits, and would be created once somebody is
            assert (row["action"], row["reason"]) == (Action.NEW_DEAL.value, "no_deal_contact")
    # The hash a quarantine entry keeps is that of the deal, stable from one plan to the next.
    assert again["source_hash"].tolist() == first["source_hash"].tolist()
    assert all(
        h == content_hash(json.loads(d))
        for h, d in zip(first["source_hash"], first["deal"], strict=True)
    )


@given(st.dictionaries(st.sampled_from(["title", "value", "stage"]), st.integers(0, 3)))
def test_changed_fields_is_empty_only_when_nothing_changed(synced: dict[str, int]) -> None:
    wanted = {"title": 1, "value": 2, "stage": 3}
    changes = changed_fields(wanted, synced)
    assert (changes == {}) == (synced == wanted)
    assert {**synced, **changes} == {**synced, **wanted}


# -- what AC would refuse -----------------------------------------------------------------------
def test_a_deal_needs_a_title_of_at_most_255_characters_and_a_value_of_0_or_more() -> None:
    deals = {
        "opportunity:fine": {"title": "x" * 255, "value": 0},
        "opportunity:untitled": {"title": None, "value": 100},
        "opportunity:long": {"title": "x" * 256, "value": MAX_CENTS},
        "opportunity:negative": {"title": "Refund", "value": -500},
        "opportunity:huge": {"title": "Huge", "value": MAX_CENTS + 1},
    }
    failures = check_deals(deals)
    codes = {key: [code for code, _ in reasons] for key, reasons in failures.items()}
    assert codes == {
        "opportunity:untitled": ["missing_required"],
        "opportunity:long": ["too_long"],
        "opportunity:negative": ["value_out_of_range"],
        "opportunity:huge": ["value_out_of_range"],
    }
    assert "(-5.00)" in failures["opportunity:negative"][0][1]
    assert check_deals({}) == {}
