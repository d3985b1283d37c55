"""The accounts match (name and website domain), searched for failures with Hypothesis: a link
is one to one, and two companies are never taken for one."""

from __future__ import annotations

import pandas as pd
from crm_sync.flows.accounts import (
    domain_of,
    name_key,
    pair_towards_ac,
    pair_towards_dynamics,
)
from crm_sync.records import Action
from crm_sync.state import ObjectLink
from hypothesis import given, settings
from hypothesis import strategies as st

NAMES = st.sampled_from(["Acme", "ACME", "acme ", "Ac  me", "Globex", "globex", "Initech", ""])
HOSTS = st.sampled_from([None, "acme.example", "acme.de", "globex.example"])
URL_FORMS = st.sampled_from(["{h}", "https://{h}", "http://www.{h}/about", "HTTPS://WWW.{H}:8443"])
WRITES = (Action.NEW_ACCOUNT.value, Action.UPDATE_ACCOUNT.value)


def url(host: str | None, form: str) -> str | None:
    return None if host is None else form.format(h=host, H=host.upper())


@given(st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5}){1,2}", fullmatch=True), URL_FORMS)
def test_every_spelling_of_a_website_gives_its_domain(host: str, form: str) -> None:
    assert domain_of(url(host, form)) == host.removeprefix("www.")


@given(st.text(min_size=1, max_size=20))
def test_the_name_key_ignores_case_and_runs_of_spaces(name: str) -> None:
    key = name_key(name)
    assert name_key(f"  {name.upper()}  ") == (name_key(name.upper()))
    assert key is None or ("  " not in key and key == key.strip())


@st.composite
def worlds(draw: st.DrawFn) -> tuple[pd.DataFrame, pd.DataFrame, list[ObjectLink]]:
    """Dynamics accounts, AC accounts (unique names, as AC keeps them) and one-to-one links."""
    n_dv = draw(st.integers(0, 6))
    dv = pd.DataFrame(
        {
            "dataverse_id": [f"d{i}" for i in range(n_dv)],
            "name": [draw(NAMES) or None for _ in range(n_dv)],
            "websiteurl": [url(draw(HOSTS), draw(URL_FORMS)) for _ in range(n_dv)],
            "statecode": [draw(st.sampled_from(["0", "0", "1"])) for _ in range(n_dv)],
        }
    )
    # Unique as AC keeps them (trimmed, without case): "Ac  me" and "acme " are two accounts
    # to AC, one name to the match.
    ac_rows, seen = [], set()
    for i in range(draw(st.integers(0, 5))):
        name = draw(NAMES)
        if not name_key(name) or name.strip().lower() in seen:
            continue
        seen.add(name.strip().lower())
        ac_rows.append({"ac_id": str(i), "name": name, "accountUrl": url(draw(HOSTS), "{h}")})
    ac = pd.DataFrame(ac_rows, columns=["ac_id", "name", "accountUrl"])
    pairs = list(zip(dv["dataverse_id"], ac["ac_id"], strict=False))
    linked = draw(st.lists(st.sampled_from(pairs), unique=True)) if pairs else []
    # One to one, as the store keeps them: a second link of either id is dropped.
    links, used_dv, used_ac = [], set(), set()
    for dvid, ac_id in linked:
        if dvid not in used_dv and ac_id not in used_ac:
            links.append(ObjectLink("account", dvid, ac_id, "dynamics365", {}))
            used_dv.add(dvid)
            used_ac.add(ac_id)
    return dv, ac, links


def _domains_agree(a: str | None, b: str | None) -> bool:
    return domain_of(a) is None or domain_of(b) is None or domain_of(a) == domain_of(b)


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_towards_activecampaign_a_match_is_one_to_one_and_same_company(world: tuple) -> None:
    dv, ac, links = world
    out = pair_towards_ac(dv, ac, links)
    assert sorted(out["dataverse_id"]) == sorted(dv["dataverse_id"])  # none dropped
    linked_dv = {lk.dataverse_id: lk.ac_id for lk in links}
    holder = {lk.ac_id: lk.dataverse_id for lk in links}
    updates = out[out["action"] == Action.UPDATE_ACCOUNT.value]
    assert updates["ac_id"].is_unique
    urls = dict(zip(ac["ac_id"], ac["accountUrl"], strict=True))
    names = dict(zip(ac["ac_id"], ac["name"], strict=True))
    for row in out.to_dict("records"):
        mine = dv[dv["dataverse_id"] == row["dataverse_id"]].iloc[0]
        if row["dataverse_id"] in linked_dv:  # a link decides, whatever the names say
            assert row["action"] in WRITES
            continue
        if row["action"] == Action.UPDATE_ACCOUNT.value:  # matched by name
            assert row["relink"]
            assert holder.get(row["ac_id"]) in (None, row["dataverse_id"])
            assert name_key(names[row["ac_id"]]) == name_key(mine["name"])
            assert _domains_agree(mine["websiteurl"], urls[row["ac_id"]])
        if row["action"] == Action.UPDATE_ACCOUNT.value:
            # One AC account of that name (for the match): never one of two twins.
            twins = [n for n in ac["name"] if name_key(n) == name_key(mine["name"])]
            assert len(twins) == 1
        if row["action"] == Action.NEW_ACCOUNT.value and name_key(mine["name"]):
            # Created only where AC has no account of that name (AC would refuse it).
            assert name_key(mine["name"]) not in {name_key(n) for n in ac["name"]}
    # Two unlinked Dynamics accounts of one name never both go through.
    unlinked = out[~out["dataverse_id"].isin(list(linked_dv)) & out["action"].isin(WRITES)]
    keys = [name_key(dv.set_index("dataverse_id").loc[i, "name"]) for i in unlinked["dataverse_id"]]
    keys = [k for k in keys if k]
    assert len(keys) == len(set(keys))


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_towards_dynamics_a_match_is_one_to_one_and_same_company(world: tuple) -> None:
    dv, ac, links = world
    out = pair_towards_dynamics(dv, ac, links)
    assert sorted(out["ac_id"]) == sorted(ac["ac_id"])
    linked_ac = {lk.ac_id: lk.dataverse_id for lk in links}
    held = {lk.dataverse_id for lk in links}
    relinks = out[out["relink"].astype(bool)]
    assert relinks["dataverse_id"].is_unique  # AC names are unique: one match at most
    by_dv = dv.set_index("dataverse_id")
    for row in out.to_dict("records"):
        mine = ac[ac["ac_id"] == row["ac_id"]].iloc[0]
        if row["ac_id"] in linked_ac:
            assert row["dataverse_id"] == linked_ac[row["ac_id"]]
            continue
        if row["action"] == Action.UPDATE_ACCOUNT.value:
            target = by_dv.loc[row["dataverse_id"]]
            assert row["dataverse_id"] not in held
            assert target["statecode"] == "0"
            assert name_key(target["name"]) == name_key(mine["name"])
            assert _domains_agree(target["websiteurl"], mine["accountUrl"])
        if row["action"] == Action.QUARANTINE.value:
            assert row["reason"] == "duplicate_account"


def test_two_dynamics_accounts_of_one_name_are_told_apart_by_their_domain() -> None:
    dv = pd.DataFrame(
        {
            "dataverse_id": ["d1", "d2"],
            "name": ["Acme", "Acme"],
            "websiteurl": ["https://acme.example", "acme.de"],
            "statecode": ["0", "0"],
        }
    )
    ac = pd.DataFrame({"ac_id": ["7"], "name": ["ACME"], "accountUrl": ["www.acme.de"]})
    out = pair_towards_dynamics(dv, ac, [])
    assert out[["dataverse_id", "action"]].to_dict("records") == [
        {"dataverse_id": "d2", "action": Action.UPDATE_ACCOUNT.value}
    ]
