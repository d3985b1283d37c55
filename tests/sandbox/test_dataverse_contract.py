"""Contract tests of the Dataverse Web API emulator against a running sandbox process.

Each test pins facts of the reference notes' checklist (status code, headers, body shape).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msal
import pytest
import requests

from sandbox.dataverse.seed import seed_dataverse

pytestmark = pytest.mark.sandbox

NS = "Microsoft.Dynamics.CRM"
JSON_TYPE = "application/json; odata.metadata=minimal"
GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
UTC_SECONDS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
ETAG = re.compile(r'^W/"\d+"$')


class DV:
    """A bare Web API client with an MSAL token (no retries: the tests see every status)."""

    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self.root = sandbox.d365_url
        self.api = f"{self.root}/api/data/v9.2/"
        self.http = requests.Session()
        self.http.verify = sandbox.ca_path
        self.http.trust_env = False
        creds = sandbox.credentials
        app = msal.ConfidentialClientApplication(
            creds.client_id,
            client_credential=creds.client_secret,
            authority=f"{self.root}/{creds.tenant_id}",
            instance_discovery=False,
            http_client=self.http,
        )
        token = app.acquire_token_for_client(scopes=[f"{self.root}/.default"])["access_token"]
        self.http.headers.update(
            {
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "OData-MaxVersion": "4.0",
                "OData-Version": "4.0",
            }
        )

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = path if path.startswith("https://") else self.api + path
        return self.http.request(method, url, timeout=60, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, json=json, **kwargs)

    def patch(self, path: str, json: Any = None, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, json=json, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def create(self, entity_set: str = "leads", **values: Any) -> dict[str, Any]:
        response = self.post(entity_set, values, headers={"Prefer": "return=representation"})
        assert response.status_code == 201, response.text
        return response.json()

    def config(self, **settings: Any) -> dict[str, Any]:
        return self.sandbox.admin("d365", "PUT", "config", json=settings)

    def ids(self, entity_set: str, query: str = "") -> list[str]:
        key = entity_set[:-1] + "id"
        response = self.get(f"{entity_set}?$select={key}{query}")
        assert response.status_code == 200, response.text
        return [row[key] for row in response.json()["value"]]


@pytest.fixture
def dv(sandbox: Any) -> DV:
    return DV(sandbox)


def assert_error(response: requests.Response, status: int, code: str, message: str) -> None:
    """The documented error shape: `{"error": {"code", "message"}}` with the OData headers."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.headers["OData-Version"] == "4.0"
    assert response.json() == {"error": {"code": code, "message": message}}


# -- general ------------------------------------------------------------------------------------


def test_whoami_and_the_headers_every_response_carries(dv: DV) -> None:
    for response in (dv.get("WhoAmI"), dv.get("nosuchset")):
        assert response.headers["OData-Version"] == "4.0"
        assert response.headers["Content-Type"] == JSON_TYPE
        assert re.fullmatch(GUID, response.headers["x-ms-service-request-id"])
        assert response.headers["REQ_ID"] == response.headers["x-ms-service-request-id"]
        assert int(response.headers["x-ms-dop-hint"]) >= 1
        assert int(response.headers["x-ms-ratelimit-burst-remaining-xrm-requests"]) >= 0
        time_left = response.headers["x-ms-ratelimit-time-remaining-xrm-requests"]
        assert re.fullmatch(r"\d{1,3}(,\d{3})*\.\d{2}", time_left)
    body = dv.get("WhoAmI").json()
    assert body["@odata.context"] == f"{dv.api}$metadata#{NS}.WhoAmIResponse"
    for key in ("UserId", "BusinessUnitId", "OrganizationId"):
        assert re.fullmatch(GUID, body[key])


def test_retrieve_user_privileges_and_a_privilege_taken_away(dv: DV) -> None:
    me = dv.get("WhoAmI").json()
    path = f"systemusers({me['UserId']})/{NS}.RetrieveUserPrivileges()"

    def held() -> dict[str, dict[str, Any]]:
        response = dv.get(path)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["@odata.context"] == f"{dv.api}$metadata#{NS}.RetrieveUserPrivilegesResponse"
        return {p["PrivilegeName"]: p for p in body["RolePrivileges"]}

    privileges = held()
    for table in ("Lead", "Contact"):
        for operation in ("Create", "Read", "Write", "Delete", "Append", "AppendTo"):
            privilege = privileges[f"prv{operation}{table}"]
            assert privilege["Depth"] == "Global"
            assert re.fullmatch(GUID, privilege["PrivilegeId"])
            assert privilege["BusinessUnitId"] == me["BusinessUnitId"]

    changed = dv.sandbox.admin(
        "d365", "PUT", "privileges", json={"prvWriteLead": None, "prvReadContact": "Basic"}
    )
    assert "prvWriteLead" not in changed
    privileges = held()
    assert "prvWriteLead" not in privileges
    assert privileges["prvReadContact"]["Depth"] == "Basic"

    # Enforced: a write needing the privilege is refused with PrivilegeDenied; others still work.
    lead = dv.create("leads", lastname="Priv", subject="s")
    denied = dv.patch(f"leads({lead['leadid']})", {"firstname": "X"}, headers={"If-Match": "*"})
    assert denied.status_code == 403, denied.text
    error = denied.json()["error"]
    assert error["code"] == "0x80040220"
    assert "is missing prvWriteLead privilege" in error["message"]
    target = {"@odata.type": f"{NS}.lead", "leadid": lead["leadid"], "firstname": "X"}
    bulk = dv.post(f"leads/{NS}.UpdateMultiple", {"Targets": [target]})
    assert bulk.status_code == 403, bulk.text
    assert dv.get("contacts?$top=1").status_code == 200  # Basic depth: reported, not enforced

    unknown = dv.get(f"systemusers({uuid.uuid4()})/{NS}.RetrieveUserPrivileges()")
    assert unknown.status_code == 404
    with pytest.raises(requests.HTTPError):
        dv.sandbox.admin("d365", "PUT", "privileges", json={"prvReadCompetitor": "Global"})
    dv.sandbox.admin("d365", "POST", "reset")
    assert held()["prvWriteLead"]["Depth"] == "Global"


@pytest.mark.parametrize("segment", ["Leads", "Account", "lead"])
def test_unknown_or_miscased_entity_set_is_404(dv: DV, segment: str) -> None:
    assert_error(
        dv.get(segment), 404, "0x8006088a", f"Resource not found for the segment '{segment}'."
    )


def test_entity_definitions_and_string_max_lengths(dv: DV) -> None:
    response = dv.get("EntityDefinitions(LogicalName='lead')")
    assert response.status_code == 200
    lead = response.json()
    assert (lead["LogicalName"], lead["EntitySetName"], lead["PrimaryIdAttribute"]) == (
        "lead",
        "leads",
        "leadid",
    )
    assert lead["ChangeTrackingEnabled"] is True
    assert lead["CanChangeTrackingBeEnabled"]["Value"] is True
    path = (
        "EntityDefinitions(LogicalName='{}')/Attributes/"
        f"{NS}.StringAttributeMetadata?$select=LogicalName,MaxLength"
    )
    lengths = {
        name: {a["LogicalName"]: a["MaxLength"] for a in dv.get(path.format(name)).json()["value"]}
        for name in ("lead", "contact")
    }
    assert lengths["lead"]["firstname"] == 50
    assert lengths["lead"]["emailaddress1"] == 100
    assert lengths["lead"]["subject"] == 300
    assert lengths["lead"]["mobilephone"] == 20
    assert lengths["contact"]["mobilephone"] == 50
    assert lengths["contact"]["address1_name"] == 200
    assert "subject" not in lengths["contact"]
    attrs = dv.get(path.format("lead")).json()["value"]
    assert all(set(a) == {"@odata.type", "LogicalName", "MaxLength"} for a in attrs)
    one = dv.get("EntityDefinitions(LogicalName='contact')?$select=LogicalName,EntitySetName")
    assert one.json()["EntitySetName"] == "contacts"
    assert dv.get("EntityDefinitions(LogicalName='competitor')").status_code == 404


# -- reads -------------------------------------------------------------------------------------


def test_retrieve_one_row_with_select(dv: DV) -> None:
    lead = dv.create(firstname="Ada", lastname="Lovelace", emailaddress1="ada@example.com")
    response = dv.get(f"leads({lead['leadid']})?$select=firstname,lastname")
    assert response.status_code == 200
    assert response.headers["ETag"] == lead["@odata.etag"]
    assert response.json() == {
        "@odata.context": f"{dv.api}$metadata#leads(firstname,lastname)/$entity",
        "@odata.etag": lead["@odata.etag"],
        "firstname": "Ada",
        "lastname": "Lovelace",
        "leadid": lead["leadid"],
    }
    cached = dv.get(f"leads({lead['leadid']})", headers={"If-None-Match": lead["@odata.etag"]})
    assert cached.status_code == 304
    assert dv.get(f"leads({lead['leadid']})", headers={"If-None-Match": "null"}).status_code == 200


def test_missing_row_is_404_object_does_not_exist(dv: DV) -> None:
    row_id = str(uuid.uuid4())
    assert_error(
        dv.get(f"leads({row_id})"), 404, "0x80040217", f"lead With Id = {row_id} Does Not Exist"
    )


def test_unknown_select_column_is_400(dv: DV) -> None:
    assert_error(
        dv.get("leads?$select=Firstname"),
        400,
        "0x0",
        f"Could not find a property named 'Firstname' on type '{NS}.lead'.",
    )


def test_collection_shape_always_has_key_and_etag(dv: DV) -> None:
    dv.create(firstname="A", lastname="B")
    body = dv.get("leads?$select=fullname").json()
    assert body["@odata.context"] == f"{dv.api}$metadata#leads(fullname)"
    (row,) = body["value"]
    assert set(row) == {"@odata.etag", "fullname", "leadid"}
    assert ETAG.match(row["@odata.etag"])


def seed_people(dv: DV) -> dict[str, str]:
    people = {
        "obrien": {"firstname": "Seán", "lastname": "O'Brien", "emailaddress1": "Sean@Example.com",
                   "telephone1": "+1 555 1000", "leadsourcecode": 1},
        "smith": {"firstname": "Ann", "lastname": "Smith", "emailaddress1": "ann@example.org",
                  "leadsourcecode": 5},
        "muller": {"firstname": "Jürgen", "lastname": "Müller", "emailaddress1": "jm@example.net",
                   "telephone1": "+49 30 1", "leadsourcecode": 9, "donotemail": True},
        "lee": {"firstname": "Lee", "lastname": "LEE", "leadsourcecode": 10},
    }  # fmt: skip
    return {name: dv.create(**values)["leadid"] for name, values in people.items()}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("emailaddress1 eq 'sean@example.COM'", {"obrien"}),
        ("lastname eq 'O''Brien'", {"obrien"}),
        ("lastname ne 'Smith'", {"obrien", "muller", "lee"}),
        ("leadsourcecode gt 1", {"smith", "muller", "lee"}),
        ("leadsourcecode ge 5 and leadsourcecode le 5", {"smith"}),
        ("leadsourcecode lt 5 or lastname eq 'müller'", {"obrien", "muller"}),
        ("not (leadsourcecode eq 5)", {"obrien", "muller", "lee"}),
        ("not (telephone1 eq '+1 555 1000')", {"smith", "muller", "lee"}),
        ("contains(lastname,'BRIE')", {"obrien"}),
        ("startswith(firstname,'jü')", {"muller"}),
        ("endswith(emailaddress1,'.ORG')", {"smith"}),
        ("contains(emailaddress1,'example.n_t')", {"muller"}),
        ("telephone1 eq null", {"smith", "lee"}),
        ("emailaddress1 eq null", {"lee"}),
        ("telephone1 ne null and donotemail eq false", {"obrien"}),
        ("donotemail", {"muller"}),
        ("createdon gt 2000-01-01T00:00:00Z", {"obrien", "smith", "muller", "lee"}),
        ("createdon lt 2000-01-01T00:00:00+02:00", set()),
        (
            f"{NS}.In(PropertyName='lastname',PropertyValues=['smith','MÜLLER'])",
            {"smith", "muller"},
        ),
        ("firstname eq lastname", {"lee"}),
        ("firstname eq @p1", {"smith"}),
        (
            f"{NS}.LastXDays(PropertyName='createdon',PropertyValue=7)",
            {"obrien", "smith", "muller", "lee"},
        ),
        (f"not {NS}.LastXDays(PropertyName='createdon',PropertyValue=7)", set()),
        (
            f'{NS}.Between(PropertyName=\'leadsourcecode\',PropertyValues=["5","9"])',
            {"smith", "muller"},
        ),
    ],
)
def test_filter(dv: DV, expression: str, expected: set[str]) -> None:
    ids = seed_people(dv)
    params = {"$select": "leadid", "$filter": expression, "@p1": "'ann'"}
    response = dv.get("leads", params=params)
    assert response.status_code == 200, response.text
    found = {row["leadid"] for row in response.json()["value"]}
    assert found == {ids[name] for name in expected}


def test_quoted_injection_matches_only_that_literal(dv: DV) -> None:
    dv.create(lastname="Smith")
    dv.create(lastname="a")
    target = dv.create(lastname="x' or 1 eq 1 or 'a")["leadid"]
    escaped = "lastname eq 'x'' or 1 eq 1 or ''a'"
    assert dv.ids("leads", f"&$filter={escaped}") == [target]
    unescaped = dv.get("leads", params={"$filter": "lastname eq 'x' or 1 eq 1 or 'a'"})
    assert unescaped.status_code == 400
    assert unescaped.json()["error"]["code"] == "0x0"


def test_long_or_chains_work_up_to_the_url_length_limit(dv: DV) -> None:
    needle = dv.create(lastname="Needle", emailaddress1="needle@example.com")["leadid"]
    emails = [f"someone.{i}@example.com" for i in range(500)] + ["NEEDLE@example.com"]
    expression = " or ".join(f"emailaddress1 eq '{e}'" for e in emails)
    assert dv.ids("leads", f"&$filter={expression}") == [needle]
    longer = " or ".join(f"emailaddress1 eq 'someone.{i}@example.com'" for i in range(1000))
    response = dv.get("leads", params={"$filter": longer})
    assert response.status_code == 414
    assert response.json()["error"]["message"].startswith("The request URL is too long")


def test_unterminated_literal_is_400(dv: DV) -> None:
    response = dv.get("leads", params={"$filter": "lastname eq 'O'Brien'"})
    assert response.status_code == 400
    assert "unterminated string literal" in response.json()["error"]["message"]


def test_orderby_top_and_counts(dv: DV) -> None:
    for first, last in [("B", "Young"), ("A", "Young"), ("C", "Adams"), ("D", "young")]:
        dv.create(firstname=first, lastname=last)
    response = dv.get(
        "leads?$select=firstname&$orderby=lastname desc,firstname asc&$top=3&$count=true"
    )
    body = response.json()
    assert [r["firstname"] for r in body["value"]] == ["A", "B", "D"]
    assert body["@odata.count"] == 4
    assert "@odata.nextLink" not in body
    count = dv.get("leads/$count?$filter=lastname eq 'young'")
    assert count.status_code == 200
    assert count.headers["Content-Type"].startswith("text/plain")
    assert count.text == "3"


@pytest.mark.parametrize("option", ["$skip=1", "$search=x", "$format=json"])
def test_unsupported_query_options_are_400(dv: DV, option: str) -> None:
    response = dv.get(f"leads?{option}")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        f"The query parameter '{option.split('=')[0]}' is not supported."
    )


def test_count_is_capped_at_5000(dv: DV) -> None:
    seed_dataverse(dv.sandbox.data_dir, seed=11, leads=5100, contacts=0)
    response = dv.get(
        "leads?$select=leadid&$top=1&$count=true",
        headers={"Prefer": 'odata.include-annotations="*"'},
    )
    body = response.json()
    assert body["@odata.count"] == 5000
    assert body[f"@{NS}.totalrecordcount"] == 5000
    assert body[f"@{NS}.totalrecordcountlimitexceeded"] is True
    assert dv.get("leads/$count").text == "5000"


def page_through(dv: DV, url: str, page_size: int) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    links: list[str] = []
    while url:
        response = dv.get(url, headers={"Prefer": f"odata.maxpagesize={page_size}"})
        assert response.status_code == 200, response.text
        assert response.headers["Preference-Applied"] == f"odata.maxpagesize={page_size}"
        body = response.json()
        assert len(body["value"]) <= page_size
        rows += body["value"]
        url = body.get("@odata.nextLink", "")
        if url:
            links.append(url)
    return rows, links


def test_paging_10000_seeded_rows_returns_each_once(dv: DV) -> None:
    counts = seed_dataverse(dv.sandbox.data_dir, seed=5, leads=10_000, contacts=0)
    assert counts == {"leads": 10_000, "contacts": 0}
    full_page = dv.get("leads", headers={"Prefer": "odata.maxpagesize=5000"})
    assert full_page.headers["Content-Encoding"] == "gzip"
    assert len(full_page.json()["value"]) == 5000
    rows, links = page_through(dv, f"{dv.api}leads?$select=emailaddress1", 2000)
    assert len(links) == 4
    for link in links:
        assert link.startswith(f"{dv.api}leads?$select=emailaddress1&$skiptoken=")
    ids = [row["leadid"] for row in rows]
    assert len(ids) == len(set(ids)) == 10_000


def test_keyset_paging_is_stable_under_concurrent_inserts(dv: DV) -> None:
    seed_dataverse(dv.sandbox.data_dir, seed=6, leads=3000, contacts=0)
    before = set(dv.ids("leads"))
    url = f"{dv.api}leads?$select=leadid,modifiedon&$orderby=modifiedon asc,leadid asc"
    seen: list[str] = []
    while url:
        body = dv.get(url, headers={"Prefer": "odata.maxpagesize=700"}).json()
        seen += [row["leadid"] for row in body["value"]]
        url = body.get("@odata.nextLink", "")
        targets = [{"@odata.type": f"{NS}.lead", "lastname": f"During {i}"} for i in range(50)]
        assert dv.post(f"leads/{NS}.CreateMultiple", {"Targets": targets}).status_code == 200
    assert len(seen) == len(set(seen))
    assert before <= set(seen)


def test_top_is_ignored_when_maxpagesize_is_sent(dv: DV) -> None:
    seed_dataverse(dv.sandbox.data_dir, seed=8, leads=12, contacts=0)
    response = dv.get("leads?$top=3", headers={"Prefer": "odata.maxpagesize=5"})
    body = response.json()
    assert len(body["value"]) == 5
    assert "@odata.nextLink" in body


def test_formatted_value_and_lookup_annotations(dv: DV) -> None:
    lead = dv.create(lastname="Annotated", leadsourcecode=8)
    response = dv.get(
        f"leads({lead['leadid']})?$select=statecode,leadsourcecode,_ownerid_value,createdon",
        headers={"Prefer": 'odata.include-annotations="*"'},
    )
    body = response.json()
    formatted = "@OData.Community.Display.V1.FormattedValue"
    assert body[f"statecode{formatted}"] == "Open"
    assert body[f"leadsourcecode{formatted}"] == "Web"
    assert body[f"_ownerid_value@{NS}.lookuplogicalname"] == "systemuser"
    assert body[f"_ownerid_value{formatted}"]
    assert response.headers["Preference-Applied"] == 'odata.include-annotations="*"'
    plain = dv.get(f"leads({lead['leadid']})?$select=statecode").json()
    assert not any("@OData.Community" in key for key in plain)


# -- writes ------------------------------------------------------------------------------------


def test_create_answers_204_with_odata_entity_id_and_sets_server_columns(dv: DV) -> None:
    response = dv.post(
        "leads",
        {"firstname": "Grace", "lastname": "Hopper", "createdon": "1999-01-01T00:00:00Z",
         "fullname": "ignored", "statecode": 2},
    )  # fmt: skip
    assert response.status_code == 204
    assert response.content == b""
    match = re.fullmatch(
        rf"{re.escape(dv.api)}leads\(({GUID})\)", response.headers["OData-EntityId"]
    )
    assert match
    row = dv.get(f"leads({match.group(1)})").json()
    assert row["fullname"] == "Grace Hopper"
    assert (row["statecode"], row["statuscode"]) == (0, 1)
    assert UTC_SECONDS.match(row["createdon"]) and row["createdon"] != "1999-01-01T00:00:00Z"
    assert UTC_SECONDS.match(row["modifiedon"])
    assert isinstance(row["versionnumber"], int)
    assert row["_ownerid_value"] == dv.get("WhoAmI").json()["UserId"]
    assert row["emailaddress1"] is None


def test_create_with_return_representation_is_201(dv: DV) -> None:
    response = dv.post(
        "leads?$select=lastname",
        {"lastname": "Rep"},
        headers={"Prefer": "return=representation"},
    )
    assert response.status_code == 201
    assert "OData-EntityId" not in response.headers
    assert response.headers["Preference-Applied"] == "return=representation"
    body = response.json()
    assert body["@odata.context"] == f"{dv.api}$metadata#leads(lastname)/$entity"
    assert response.headers["ETag"] == body["@odata.etag"]
    assert set(body) == {"@odata.context", "@odata.etag", "lastname", "leadid"}


def test_update_changes_the_etag_every_time(dv: DV) -> None:
    lead = dv.create(lastname="Etag")
    path = f"leads({lead['leadid']})"
    first = dv.patch(path, {"jobtitle": "CTO"})
    assert first.status_code == 204
    tag1 = dv.get(path).json()["@odata.etag"]
    second = dv.patch(path, {"jobtitle": "CTO"}, headers={"Prefer": "return=representation"})
    assert second.status_code == 200
    assert len({lead["@odata.etag"], tag1, second.json()["@odata.etag"]}) == 3


def test_patch_without_if_match_upserts_with_the_given_id(dv: DV) -> None:
    row_id = str(uuid.uuid4())
    created = dv.patch(f"leads({row_id})", {"lastname": "Upserted"})
    assert created.status_code == 204
    assert created.headers["OData-EntityId"] == f"{dv.api}leads({row_id})"
    assert dv.get(f"leads({row_id})").json()["lastname"] == "Upserted"
    other = str(uuid.uuid4())
    rep = dv.patch(
        f"leads({other})", {"lastname": "X"}, headers={"Prefer": "return=representation"}
    )
    assert rep.status_code == 201
    again = dv.patch(
        f"leads({other})", {"lastname": "Y"}, headers={"Prefer": "return=representation"}
    )
    assert again.status_code == 200


def test_conditional_operations(dv: DV) -> None:
    missing = str(uuid.uuid4())
    assert_error(
        dv.patch(f"leads({missing})", {"lastname": "x"}, headers={"If-Match": "*"}),
        404,
        "0x80040217",
        f"lead With Id = {missing} Does Not Exist",
    )
    lead = dv.create(lastname="Cond")
    path = f"leads({lead['leadid']})"
    assert_error(
        dv.patch(path, {"lastname": "x"}, headers={"If-None-Match": "*"}),
        412,
        "0x80040237",
        "A record with matching key values already exists.",
    )
    stale = 'W/"1"'
    message = "The version of the existing record doesn't match the RowVersion property provided."
    assert_error(
        dv.patch(path, {"lastname": "x"}, headers={"If-Match": stale}), 412, "0x80060882", message
    )
    assert_error(dv.delete(path, headers={"If-Match": stale}), 412, "0x80060882", message)
    ok = dv.patch(path, {"lastname": "y"}, headers={"If-Match": lead["@odata.etag"]})
    assert ok.status_code == 204
    created = dv.patch(f"leads({missing})", {"lastname": "n"}, headers={"If-None-Match": "*"})
    assert created.status_code == 204


def test_delete_then_404(dv: DV) -> None:
    lead = dv.create(lastname="Gone")
    assert dv.delete(f"leads({lead['leadid']})").status_code == 204
    assert dv.delete(f"leads({lead['leadid']})").status_code == 404
    assert dv.get(f"leads({lead['leadid']})").status_code == 404


def test_alternate_key_on_emailaddress1(dv: DV) -> None:
    by_key = "leads(emailaddress1='key@example.com')"
    assert_error(
        dv.get(by_key),
        400,
        "0x0",
        f"The key in the request URI is not valid for resource '{NS}.lead'. Ensure that the "
        "names and number of key properties match the declared or alternate key properties for "
        f"the resource '{NS}.lead'.",
    )
    dv.config(alternate_key={"leads": True})
    created = dv.patch(by_key, {"lastname": "Keyed"})
    assert created.status_code == 204
    row = dv.get(by_key).json()
    assert row["emailaddress1"] == "key@example.com"
    updated = dv.patch(by_key, {"lastname": "Rekeyed", "emailaddress1": "other@example.com"})
    assert updated.status_code == 204
    row = dv.get(f"leads({row['leadid']})").json()
    assert (row["lastname"], row["emailaddress1"]) == ("Rekeyed", "key@example.com")
    assert_error(
        dv.post("leads", {"lastname": "Dup", "emailaddress1": "KEY@example.com"}),
        412,
        "0x80040237",
        "A record with matching key values already exists.",
    )
    assert dv.get("leads(emailaddress1='nobody@example.com')").status_code == 404
    assert dv.delete(by_key).status_code == 204


def test_alternate_key_cannot_be_activated_over_duplicates(dv: DV) -> None:
    dv.create("contacts", lastname="A", emailaddress1="same@example.com")
    dv.create("contacts", lastname="B", emailaddress1="SAME@example.com")
    with pytest.raises(requests.HTTPError, match="409"):
        dv.config(alternate_key={"contacts": True})


@pytest.mark.parametrize(
    ("entity_set", "column", "limit"),
    [("leads", "firstname", 50), ("leads", "subject", 300), ("leads", "mobilephone", 20),
     ("contacts", "mobilephone", 50), ("contacts", "emailaddress1", 100)],
)  # fmt: skip
def test_max_length_is_enforced(dv: DV, entity_set: str, column: str, limit: int) -> None:
    assert dv.post(entity_set, {column: "x" * limit}).status_code == 204
    entity = entity_set[:-1]
    assert_error(
        dv.post(entity_set, {column: "x" * (limit + 1)}),
        400,
        "0x80044331",
        f"A validation error occurred.  The length of the '{column}' attribute of the "
        f"'{entity}' entity exceeded the maximum allowed length of '{limit}'.",
    )


def test_unknown_body_property_is_400(dv: DV) -> None:
    assert_error(
        dv.post("leads", {"FirstName": "x"}),
        400,
        "0x0",
        "An error occurred while validating input parameters: Microsoft.Crm.CrmException: "
        f"Invalid property 'FirstName' was found in entity '{NS}.lead'.",
    )


def test_duplicate_detection_only_when_asked_and_rule_on(dv: DV) -> None:
    dv.create("contacts", lastname="First", emailaddress1="dup@example.com")
    detect = {"MSCRM.SuppressDuplicateDetection": "false"}
    assert_error(
        dv.post(
            "contacts", {"lastname": "Second", "emailaddress1": "DUP@example.com"}, headers=detect
        ),
        500,
        "0x80040333",
        "A record was not created or updated because a duplicate of the current record already "
        "exists.",
    )
    assert (
        dv.post("contacts", {"lastname": "Third", "emailaddress1": "dup@example.com"}).status_code
        == 204
    )
    dv.config(duplicate_detection={"contacts": False})
    again = dv.post(
        "contacts", {"lastname": "Fourth", "emailaddress1": "dup@example.com"}, headers=detect
    )
    assert again.status_code == 204


def test_application_required_only_in_strict_mode(dv: DV) -> None:
    assert dv.post("leads", {"firstname": "NoLastName"}).status_code == 204
    dv.config(strict=True)
    response = dv.post("leads", {"firstname": "NoLastName"})
    assert response.status_code == 400
    assert "lastname" in response.json()["error"]["message"]
    assert dv.post("leads", {"lastname": "L", "subject": "S"}).status_code == 204


def test_state_and_status_transitions(dv: DV) -> None:
    lead = dv.create(lastname="Stately")
    path = f"leads({lead['leadid']})"
    assert dv.patch(path, {"statecode": 2, "statuscode": 6}).status_code == 204
    assert_error(
        dv.patch(path, {"statecode": 0, "statuscode": 3}),
        400,
        "0x80048408",
        "State code is invalid or state code is valid but status code is invalid for a specified "
        "state code.",
    )
    assert dv.patch(path, {"statecode": 0, "statuscode": 2}).status_code == 204
    assert dv.get(path).json()["statuscode"] == 2
    contact = dv.create("contacts", lastname="Inactive")
    assert dv.patch(f"contacts({contact['contactid']})", {"statecode": 1}).status_code == 204
    assert dv.get(f"contacts({contact['contactid']})").json()["statuscode"] == 2
    bad = dv.patch(f"contacts({contact['contactid']})", {"statecode": 1, "statuscode": 1})
    assert bad.status_code == 400


def test_qualify_lead_creates_the_contact_with_originating_lead(dv: DV) -> None:
    lead = dv.create(firstname="Quin", lastname="O'Neil", emailaddress1="q@example.com",
                     companyname="Acme", subject="Demo")  # fmt: skip
    action = f"leads({lead['leadid']})/{NS}.QualifyLead"
    params = {
        "CreateAccount": False,
        "CreateContact": True,
        "CreateOpportunity": False,
        "Status": 3,
    }
    response = dv.post(action, params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["@odata.context"] == f"{dv.api}$metadata#Collection({NS}.crmbaseentity)"
    (created,) = body["value"]
    assert created["@odata.type"] == f"#{NS}.contact"
    contact = dv.get(f"contacts({created['contactid']})").json()
    assert contact["_originatingleadid_value"] == lead["leadid"]
    assert (contact["fullname"], contact["emailaddress1"]) == ("Quin O'Neil", "q@example.com")
    qualified = dv.get(f"leads({lead['leadid']})").json()
    assert (qualified["statecode"], qualified["statuscode"]) == (1, 3)
    assert dv.post(action, params).status_code == 400
    follow = dv.ids("contacts", f"&$filter=_originatingleadid_value eq {lead['leadid']}")
    assert follow == [created["contactid"]]


def test_originating_lead_bind_on_contact_create(dv: DV) -> None:
    lead = dv.create(lastname="Origin")
    contact = dv.create(
        "contacts",
        lastname="Bound",
        **{"originatingleadid@odata.bind": f"/leads({lead['leadid']})"},
    )
    assert contact["_originatingleadid_value"] == lead["leadid"]
    response = dv.post("contacts", {"lastname": "x", "parentcustomerid@odata.bind": "/leads(1)"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "0x80048d19"


# -- change tracking ---------------------------------------------------------------------------


def test_change_tracking_snapshot_then_delta_with_deletions(dv: DV) -> None:
    ids = [dv.create(lastname=f"Tracked {i}")["leadid"] for i in range(3)]
    headers = {"Prefer": "odata.track-changes,odata.maxpagesize=2"}
    first = dv.get("leads?$select=lastname", headers=headers)
    assert first.status_code == 200
    assert first.headers["Preference-Applied"] == "odata.track-changes,odata.maxpagesize=2"
    page1 = first.json()
    assert len(page1["value"]) == 2 and "@odata.deltaLink" not in page1
    page2 = dv.get(page1["@odata.nextLink"], headers=headers).json()
    snapshot = {row["leadid"] for row in page1["value"] + page2["value"]}
    assert snapshot == set(ids)
    delta_link = page2["@odata.deltaLink"]
    assert re.fullmatch(
        rf"{re.escape(dv.api)}leads\?\$select=lastname&\$deltatoken=\S+", delta_link
    )

    dv.sandbox.admin("d365", "PATCH", f"rows/leads/{ids[0]}", json={"lastname": "Edited in D365"})
    new = dv.create(lastname="New")["leadid"]
    assert dv.delete(f"leads({ids[1]})").status_code == 204

    delta = dv.get(delta_link, headers={"Prefer": "odata.track-changes"})
    assert delta.status_code == 200
    body = delta.json()
    assert body["@odata.context"] == f"{dv.api}$metadata#leads(lastname)/$delta"
    upserts = [row for row in body["value"] if "reason" not in row]
    deletes = [row for row in body["value"] if "reason" in row]
    assert body["value"] == upserts + deletes
    assert {(r["leadid"], r["lastname"]) for r in upserts} == {
        (ids[0], "Edited in D365"),
        (new, "New"),
    }
    assert deletes == [
        {
            "@odata.context": f"{dv.api}$metadata#leads/$deletedEntity",
            "id": ids[1],
            "reason": "deleted",
        }
    ]
    nothing = dv.get(body["@odata.deltaLink"]).json()
    assert nothing["value"] == []
    assert "@odata.deltaLink" in nothing


def test_change_tracking_off_for_a_table_is_an_error(dv: DV) -> None:
    dv.config(change_tracking={"contacts": False})
    assert_error(
        dv.get("contacts", headers={"Prefer": "odata.track-changes"}),
        400,
        "0x80072491",
        "Entity contact isn't enabled for change tracking.",
    )


@pytest.mark.parametrize("option", ["$filter=lastname eq 'x'", "$orderby=lastname", "$top=1"])
def test_change_tracking_rejects_query_options(dv: DV, option: str) -> None:
    response = dv.get(f"leads?{option}", headers={"Prefer": "odata.track-changes"})
    assert response.status_code == 400
    name = option.split("=")[0]
    assert response.json()["error"]["message"] == (
        f'The "{name}" query parameter isn\'t supported when Change Tracking is enabled.'
    )


def test_expired_delta_token_asks_for_a_full_sync(dv: DV) -> None:
    dv.create(lastname="Old")
    link = dv.get("leads", headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]
    dv.config(change_tracking_expiry_seconds=0)
    time.sleep(1.05)
    assert_error(
        dv.get(link),
        400,
        "0x80044352",
        "Version stamp associated with the client has expired. Please perform a full sync.",
    )


# -- $batch ------------------------------------------------------------------------------------


def http_part(method: str, url: str, body: Any = None, content_id: str | None = None) -> str:
    head = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    if content_id:
        head += f"Content-ID: {content_id}\r\n"
    request = f"{method} {url} HTTP/1.1\r\n"
    if body is None:
        return f"{head}\r\n{request}Accept: application/json\r\n\r\n"
    return f"{head}\r\n{request}Content-Type: application/json; type=entry\r\n\r\n{json.dumps(body)}\r\n"


def batch_body(items: list[str | list[str]]) -> str:
    out = ""
    for item in items:
        out += "--batch_x\r\n"
        if isinstance(item, list):
            out += "Content-Type: multipart/mixed; boundary=changeset_y\r\n\r\n"
            for part in item:
                out += "--changeset_y\r\n" + part
            out += "--changeset_y--\r\n"
        else:
            out += item
    return out + "--batch_x--\r\n"


def post_batch(
    dv: DV, items: list[str | list[str]], prefer: str | None = None
) -> requests.Response:
    headers = {"Content-Type": "multipart/mixed; boundary=batch_x"}
    if prefer:
        headers["Prefer"] = prefer
    return dv.post("$batch", data=batch_body(items).encode(), headers=headers)


def parse_parts(response: requests.Response) -> list[dict[str, Any]]:
    """Every inner response in order, flattening change sets: status, headers, body."""
    content_type = response.headers["Content-Type"]
    boundary = re.search(r"boundary=(\S+)", content_type).group(1)  # type: ignore[union-attr]
    return _parts(response.content.decode(), boundary)


def _parts(text: str, boundary: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for chunk in text.split(f"--{boundary}")[1:-1]:
        head, _, rest = chunk.strip("\r\n").partition("\r\n\r\n")
        nested = re.search(r"boundary=(\S+)", head)
        if nested:
            out += [{**p, "changeset": True} for p in _parts(rest, nested.group(1))]
            continue
        status_line, _, after = rest.partition("\r\n")
        headers_text, _, body = after.partition("\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in headers_text.split("\r\n") if line)
        content_id = re.search(r"Content-ID: (\S+)", head)
        out.append(
            {
                "status": int(status_line.split()[1]),
                "headers": headers,
                "body": body.strip(),
                "content_id": content_id.group(1) if content_id else None,
            }
        )
    return out


def test_batch_change_set_with_content_id_references(dv: DV) -> None:
    change_set = [
        http_part("POST", "/api/data/v9.2/leads", {"lastname": "Batched"}, content_id="1"),
        http_part("PATCH", "$1", {"jobtitle": "Via reference"}, content_id="2"),
        http_part(
            "POST",
            "/api/data/v9.2/contacts",
            {"lastname": "Linked", "originatingleadid@odata.bind": "$1"},
            content_id="3",
        ),
    ]
    response = post_batch(dv, [change_set, http_part("GET", f"{dv.api}leads?$select=jobtitle")])
    assert response.status_code == 200
    assert re.fullmatch(
        r"multipart/mixed; boundary=batchresponse_\S+", response.headers["Content-Type"]
    )
    assert "boundary=changesetresponse_" in response.text
    parts = parse_parts(response)
    assert [p["status"] for p in parts] == [204, 204, 204, 200]
    assert [p["content_id"] for p in parts[:3]] == ["1", "2", "3"]
    lead_url = parts[0]["headers"]["OData-EntityId"]
    assert parts[0]["headers"]["OData-Version"] == "4.0"
    lead_id = lead_url.rsplit("(", 1)[1].rstrip(")")
    assert json.loads(parts[3]["body"])["value"][0]["jobtitle"] == "Via reference"
    contact_url = parts[2]["headers"]["OData-EntityId"]
    assert dv.get(contact_url).json()["_originatingleadid_value"] == lead_id


def test_failed_change_set_rolls_back(dv: DV) -> None:
    change_set = [
        http_part("POST", "leads", {"lastname": "Rolled back"}, content_id="1"),
        http_part("POST", "leads", {"lastname": "x" * 51}, content_id="2"),
    ]
    response = post_batch(dv, [change_set])
    assert response.status_code == 400
    (part,) = parse_parts(response)
    assert json.loads(part["body"])["error"]["code"] == "0x80044331"
    assert dv.ids("leads") == []


def test_batch_stops_at_first_failure_unless_continue_on_error(dv: DV) -> None:
    parts = [
        http_part("POST", "leads", {"lastname": "One"}),
        http_part("POST", "leads", {"NoSuchColumn": 1}),
        http_part("POST", "leads", {"lastname": "Three"}),
    ]
    stopped = post_batch(dv, parts)
    assert stopped.status_code == 400
    (failed,) = parse_parts(stopped)
    assert failed["status"] == 400
    assert len(dv.ids("leads")) == 1
    continued = post_batch(dv, parts, prefer="odata.continue-on-error")
    assert continued.status_code == 200
    assert [p["status"] for p in parse_parts(continued)] == [204, 400, 204]
    assert len(dv.ids("leads")) == 3


def test_batch_errors(dv: DV) -> None:
    undefined = post_batch(dv, [[http_part("PATCH", "$7", {"lastname": "x"}, content_id="1")]])
    (part,) = parse_parts(undefined)
    assert json.loads(part["body"])["error"]["message"] == (
        "Content-ID Reference: '$7' does not exist in the batch context."
    )
    assert part["status"] == 400
    get_in_set = post_batch(dv, [[http_part("GET", "leads", content_id="1")]])
    assert get_in_set.status_code == 400
    lf_only = batch_body([http_part("GET", "leads")]).replace("\r\n", "\n").encode()
    response = dv.post(
        "$batch", data=lf_only, headers={"Content-Type": "multipart/mixed; boundary=batch_x"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "0x80048d19"
    too_many = post_batch(dv, [http_part("GET", "WhoAmI")] * 1001)
    assert too_many.status_code == 400


# -- bulk actions ------------------------------------------------------------------------------


def test_create_update_upsert_multiple(dv: DV) -> None:
    targets = [
        {"@odata.type": f"{NS}.lead", "lastname": f"Bulk {i}", "emailaddress1": f"b{i}@example.com"}
        for i in range(1000)
    ]
    started = time.perf_counter()
    created = dv.post(f"leads/{NS}.CreateMultiple", {"Targets": targets})
    create_seconds = time.perf_counter() - started
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["@odata.context"] == f"{dv.api}$metadata#{NS}.CreateMultipleResponse"
    assert len(body["Ids"]) == len(set(body["Ids"])) == 1000
    assert create_seconds < 1.0
    updates = [
        {"@odata.type": f"{NS}.lead", "leadid": i, "jobtitle": "Updated"} for i in body["Ids"]
    ]
    started = time.perf_counter()
    updated = dv.post(f"leads/{NS}.UpdateMultiple", {"Targets": updates})
    assert updated.status_code == 204
    assert time.perf_counter() - started < 1.0
    assert dv.get("leads/$count?$filter=jobtitle eq 'Updated'").text == "1000"
    new_id = str(uuid.uuid4())
    upserts = [
        {"@odata.type": f"{NS}.lead", "leadid": body["Ids"][0], "jobtitle": "Upserted"},
        {"@odata.type": f"{NS}.lead", "leadid": new_id, "lastname": "Brand new"},
    ]
    upserted = dv.post(f"leads/{NS}.UpsertMultiple", {"Targets": upserts})
    assert upserted.status_code == 200
    assert upserted.json()["Ids"] == [body["Ids"][0], new_id]
    assert dv.get(f"leads({new_id})").json()["lastname"] == "Brand new"


def test_bulk_actions_are_all_or_nothing(dv: DV) -> None:
    targets = [{"@odata.type": f"{NS}.lead", "lastname": "Fine"} for _ in range(10)]
    targets.append({"@odata.type": f"{NS}.lead", "lastname": "x" * 51})
    response = dv.post(f"leads/{NS}.CreateMultiple", {"Targets": targets})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "0x80044331"
    assert dv.get("leads/$count").text == "0"
    untyped = dv.post(f"leads/{NS}.CreateMultiple", {"Targets": [{"lastname": "x"}]})
    assert untyped.status_code == 400


# -- service protection limits -----------------------------------------------------------------


def test_request_count_limit_gives_429_with_growing_retry_after(dv: DV) -> None:
    dv.sandbox.set_limits("d365", enabled=True, scale=0.001)
    remaining = [
        int(dv.get("WhoAmI").headers["x-ms-ratelimit-burst-remaining-xrm-requests"])
        for _ in range(6)
    ]
    assert remaining == [5, 4, 3, 2, 1, 0]
    throttled = dv.get("WhoAmI")
    assert_error(
        throttled,
        429,
        "0x80072322",
        "Number of requests exceeded the limit of 6 over time window of 300 seconds.",
    )
    first_wait = int(throttled.headers["Retry-After"])
    assert first_wait >= 1
    again = dv.get("WhoAmI")
    assert again.status_code == 429
    assert int(again.headers["Retry-After"]) > first_wait
    dv.sandbox.set_limits("d365", enabled=False)
    assert dv.get("WhoAmI").status_code == 200


def test_execution_time_limit_gives_429(dv: DV) -> None:
    dv.sandbox.set_limits("d365", enabled=True, scale=0.01)
    targets = [{"@odata.type": f"{NS}.lead", "lastname": f"T{i}"} for i in range(1000)]
    before = dv.get("WhoAmI").headers["x-ms-ratelimit-time-remaining-xrm-requests"]
    assert before == "12.00"
    for _ in range(3):
        assert dv.post(f"leads/{NS}.CreateMultiple", {"Targets": targets}).status_code == 200
    assert_error(
        dv.get("WhoAmI"),
        429,
        "0x80072321",
        "Combined execution time of incoming requests exceeded limit of 12,000 milliseconds over "
        "time window of 300 seconds. Decrease number of concurrent requests or reduce the "
        "duration of requests and try again later.",
    )


def test_concurrent_request_limit_fails_immediately(dv: DV) -> None:
    dv.sandbox.set_limits("d365", enabled=True, scale=0.02)
    dv.config(latency_ms=500)
    results: list[requests.Response] = []

    def call() -> None:
        results.append(dv.get("WhoAmI"))

    threads = [threading.Thread(target=call) for _ in range(4)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses[0] == 200 and statuses[-1] == 429
    throttled = next(r for r in results if r.status_code == 429)
    assert throttled.json() == {
        "error": {
            "code": "0x80072326",
            "message": "Number of concurrent requests exceeded the limit of 1.",
        }
    }
    assert "Retry-After" in throttled.headers
    assert time.perf_counter() - started < 5


def test_a_batch_counts_as_one_request(dv: DV) -> None:
    dv.sandbox.set_limits("d365", enabled=True, scale=0.001)
    response = post_batch(dv, [http_part("GET", "WhoAmI")] * 20)
    assert response.status_code == 200
    assert len(parse_parts(response)) == 20
    assert dv.get("WhoAmI").headers["x-ms-ratelimit-burst-remaining-xrm-requests"] == "4"


def test_injected_fault_answers_before_the_emulator(dv: DV) -> None:
    dv.sandbox.admin(
        "d365",
        "POST",
        "faults",
        json={"count": 1, "status": 429, "retry_after": 7, "path_prefix": "/api/data"},
    )
    (queued,) = dv.sandbox.admin("d365", "GET", "faults")["faults"]
    assert (queued["status"], queued["remaining"]) == (429, 1)
    response = dv.get("WhoAmI")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert dv.get("WhoAmI").status_code == 200
    counters = dv.sandbox.admin("d365", "GET", "counters")
    assert counters["by_status"]["429"] == 1
    assert dv.sandbox.admin("d365", "GET", "faults")["faults"] == []


# -- persistence, seeding and the admin API ----------------------------------------------------


def test_rows_survive_a_restart(dv: DV) -> None:
    lead = dv.create(lastname="Durable", emailaddress1="durable@example.com")
    dv.config(alternate_key={"leads": True})
    dv.sandbox.restart()
    after = DV(dv.sandbox)
    assert after.get(f"leads({lead['leadid']})").json()["lastname"] == "Durable"
    assert after.get("leads(emailaddress1='durable@example.com')").status_code == 200


def test_seed_written_by_this_process_is_served(dv: DV) -> None:
    counts = seed_dataverse(dv.sandbox.data_dir, seed=21, leads=60, contacts=40)
    assert counts == {"leads": 60, "contacts": 40}
    assert dv.get("leads/$count").text == "60"
    assert dv.get("contacts/$count").text == "40"
    qualified = dv.ids("contacts", "&$filter=_originatingleadid_value ne null")
    for contact_id in qualified:
        contact = dv.get(f"contacts({contact_id})").json()
        lead = dv.get(f"leads({contact['_originatingleadid_value']})").json()
        assert lead["statecode"] == 1
        assert lead["emailaddress1"] == contact["emailaddress1"]


def test_seed_is_deterministic_and_awkward(tmp_path: Path) -> None:
    def rows(directory: Path) -> list[tuple[Any, ...]]:
        seed_dataverse(directory, seed=99, leads=400, contacts=100)
        import sqlite3

        with sqlite3.connect(directory / "dataverse.db") as conn:
            return conn.execute(
                "SELECT leadid, firstname, lastname, emailaddress1, telephone1, companyname, "
                "jobtitle, subject, statecode FROM leads ORDER BY leadid"
            ).fetchall()

    first, second = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert first == second
    assert rows(tmp_path / "a") == first
    lastnames = [r[2] for r in first]
    assert any("'" in name for name in lastnames)
    assert any(not name.isascii() for name in lastnames + [r[1] for r in first])
    assert any(len(name) >= 45 for name in lastnames)
    assert all(len(name) <= 50 for name in lastnames)
    assert any(r[4] is None for r in first)
    assert any(r[3] != r[3].lower() for r in first)
    assert all(r[5] is None or len(r[5]) <= 100 for r in first)
    assert len({r[3].lower() for r in first}) == len(first)


def test_admin_row_edit_acts_as_a_dynamics_user_and_export(dv: DV) -> None:
    lead = dv.create(lastname="Before")
    edited = dv.sandbox.admin(
        "d365", "PATCH", f"rows/leads/{lead['leadid']}", json={"lastname": "After"}
    )
    assert edited["lastname"] == "After"
    assert edited["@odata.etag"] != lead["@odata.etag"]
    assert edited["_modifiedby_value"] != dv.get("WhoAmI").json()["UserId"]
    exported = dv.sandbox.admin("d365", "GET", "export/leads")
    assert exported["count"] == 1
    assert exported["value"][0]["lastname"] == "After"
    narrow = dv.sandbox.admin("d365", "GET", "export/leads", params={"columns": "lastname"})
    assert set(narrow["value"][0]) == {"@odata.etag", "lastname", "leadid"}
