"""Dynamics365Hook's account and opportunity helpers against the running Dataverse emulator:
customer lookups (`customer_bind`), `WinOpportunity` and `LoseOpportunity`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import pytest
from crm_connectors.dynamics365 import Dynamics365Hook, customer_bind
from crm_connectors.errors import ApiConnectionError, ClientError, NotFoundError
from crm_connectors.odata import ODataFilterError, eq
from crm_connectors.retry import RetryPolicy

pytestmark = pytest.mark.sandbox

WIN = "/api/data/v9.2/WinOpportunity"
LOSE = "/api/data/v9.2/LoseOpportunity"
CLOSED = ["statecode", "statuscode", "actualvalue", "actualclosedate"]


@pytest.fixture
def d365(sandbox_env, fast_retries: RetryPolicy) -> Iterator[Dynamics365Hook]:
    """A hook on the sandbox's Dataverse environment."""
    hook = Dynamics365Hook(retry_policy=fast_retries)
    yield hook
    hook.close()


def test_customer_bind_names_the_navigation_property_of_the_table() -> None:
    account_id = str(uuid.uuid4())
    assert customer_bind("parentcustomerid", "account", account_id) == {
        "parentcustomerid_account@odata.bind": f"/accounts({account_id})"
    }
    assert customer_bind("customerid", "contact", account_id.upper()) == {
        "customerid_contact@odata.bind": f"/contacts({account_id})"
    }
    assert customer_bind("parentcustomerid", "account", None) == {
        "parentcustomerid_account@odata.bind": None
    }
    with pytest.raises(ValueError, match="account or a contact"):
        customer_bind("parentcustomerid", "lead", account_id)
    with pytest.raises(ODataFilterError):
        customer_bind("parentcustomerid@odata.bind", "account", account_id)
    with pytest.raises(ValueError, match="hexadecimal"):
        customer_bind("parentcustomerid", "account", "1) or (1")


def test_customer_lookups_are_set_read_and_cleared(d365) -> None:
    contoso = d365.create_record("accounts", {"name": "Contoso", "revenue": 1_500_000})
    fabrikam = d365.create_record("accounts", {"name": "Fabrikam"})
    person = d365.create_record(
        "contacts", {"lastname": "Doe", **customer_bind("parentcustomerid", "account", contoso)}
    )
    deal = d365.create_record(
        "opportunities",
        {"name": "Renewal", **customer_bind("customerid", "contact", person)},
    )
    assert d365.get_record("contacts", person)["_parentcustomerid_value"] == contoso
    assert d365.get_record("opportunities", deal)["_customerid_value"] == person

    d365.update_record("contacts", person, customer_bind("parentcustomerid", "account", fabrikam))
    members = d365.query(
        "contacts", select=["lastname"], filter=eq("_parentcustomerid_value", uuid.UUID(fabrikam))
    )
    assert [row["contactid"] for row in members] == [person]
    d365.update_record("contacts", person, customer_bind("parentcustomerid", "account", None))
    assert d365.get_record("contacts", person)["_parentcustomerid_value"] is None

    # What the helper avoids: the lookup's own name is refused; a missing target is a 404.
    with pytest.raises(ClientError) as undeclared:
        d365.update_record(
            "contacts", person, {"parentcustomerid@odata.bind": f"/accounts({contoso})"}
        )
    assert (undeclared.value.status, undeclared.value.code) == (400, "0x80048d19")
    with pytest.raises(NotFoundError):
        d365.update_record(
            "contacts", person, customer_bind("parentcustomerid", "account", str(uuid.uuid4()))
        )


@pytest.fixture
def opportunity(d365) -> Any:
    """`opportunity(name, estimated)`: a new open opportunity of a new account; its id."""
    account = d365.create_record("accounts", {"name": "Northwind"})

    def make(name: str = "Deal", estimated: float | None = 1000.0) -> str:
        row: dict[str, Any] = {"name": name, **customer_bind("customerid", "account", account)}
        if estimated is not None:
            row["estimatedvalue"] = estimated
        return str(d365.create_record("opportunities", row))

    return make


def test_opportunities_are_won_and_lost(d365, opportunity, counted) -> None:
    won = opportunity("Won with revenue")
    d365.win_opportunity(won, "Signed", actual_revenue=1234.5, close_date=date(2025, 6, 30))
    row = d365.get_record("opportunities", won, select=CLOSED)
    assert [row[c] for c in CLOSED] == [1, 3, 1234.5, "2025-06-30"]

    estimated = opportunity("Won at the estimate", estimated=800.0)
    today = datetime.now(UTC).date().isoformat()
    d365.win_opportunity(estimated, "Signed")
    row = d365.get_record("opportunities", estimated, select=CLOSED)
    assert (row["statecode"], row["actualvalue"]) == (1, 800.0)
    assert row["actualclosedate"] in (today, datetime.now(UTC).date().isoformat())

    lost = opportunity("Lost to a rival")
    at = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)
    d365.lose_opportunity(lost, "Out-sold", status=5, close_date=at, description="Price")
    row = d365.get_record("opportunities", lost, select=CLOSED)
    assert (row["statecode"], row["statuscode"], row["actualclosedate"]) == (2, 5, "2025-07-01")
    canceled = opportunity("Canceled")
    d365.lose_opportunity(canceled, "No budget")
    assert d365.get_record("opportunities", canceled, select=CLOSED)["statuscode"] == 4
    assert counted("d365", WIN) == {204: 2} and counted("d365", LOSE) == {204: 2}


def test_closing_errors_are_typed(d365, opportunity, counted) -> None:
    deal = opportunity()
    d365.win_opportunity(deal, "Signed")
    with pytest.raises(ClientError) as closed:
        d365.win_opportunity(deal, "Signed again")
    assert (closed.value.status, closed.value.code) == (400, "0x80040515")
    with pytest.raises(ClientError) as also_closed:
        d365.lose_opportunity(deal, "Too late")
    assert also_closed.value.code == "0x80040515"

    fresh = opportunity()
    with pytest.raises(ClientError) as wrong_status:
        d365.lose_opportunity(fresh, "Won is not a loss", status=3)
    assert (wrong_status.value.status, wrong_status.value.code) == (400, "0x80048408")
    with pytest.raises(ClientError) as too_long:
        d365.win_opportunity(fresh, "x" * 201)
    assert too_long.value.code == "0x80044331"
    with pytest.raises(NotFoundError):
        d365.win_opportunity(str(uuid.uuid4()), "Nobody")
    with pytest.raises(ValueError, match="hexadecimal"):
        d365.win_opportunity("not-a-guid", "Nothing is sent")
    assert counted("d365", WIN) == {204: 1, 400: 2, 404: 1}  # 4xx: never retried

    # Reopened with a PATCH (statecode 0), it can be closed again.
    d365.update_record("opportunities", deal, {"statecode": 0, "statuscode": 1})
    d365.lose_opportunity(deal, "Lost after all")
    assert d365.get_record("opportunities", deal, select=CLOSED)["statecode"] == 2


def test_a_close_whose_answer_was_lost_is_not_sent_twice(
    d365, opportunity, counted, inject, monkeypatch
) -> None:
    # Dropped before it was applied: checked, then sent again.
    dropped = opportunity()
    inject("d365", kind="drop", path_prefix=WIN, method="POST")
    d365.win_opportunity(dropped, "Signed")
    assert d365.get_record("opportunities", dropped, select=CLOSED)["statecode"] == 1
    assert counted("d365", WIN) == {0: 1, 204: 1}

    # Applied, and then the answer was lost: found closed, not sent again (which would fail
    # with "already closed").
    applied = opportunity()
    real = d365.request
    lost = [True]

    def request(method: str, path: str, **kwargs: Any) -> Any:
        response = real(method, path, **kwargs)
        if lost and method == "POST" and path.endswith(LOSE):
            lost.clear()
            raise ApiConnectionError(
                "answer lost", maybe_sent=True, service="dynamics365", method=method, endpoint=path
            )
        return response

    monkeypatch.setattr(d365, "request", request)
    d365.lose_opportunity(applied, "Out-sold", status=5)
    assert d365.get_record("opportunities", applied, select=CLOSED)["statuscode"] == 5
    assert counted("d365", LOSE) == {204: 1}
