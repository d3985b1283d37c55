"""End to end: AC tag names are unique regardless of case; an account that already has a case
variant of a D365 tag (e.g. `d365: lead`, made by hand) syncs with it (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.world import World

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    """SQLite only: this is about the AC account's tags, not the state store."""
    return f"sqlite:///{tmp_path / 'state.db'}"


def test_a_case_variant_of_a_d365_tag_is_used_not_duplicated(world: World) -> None:
    world._ac("POST", "tags", json={"tag": {"tag": "d365: lead", "tagType": "contact"}})
    world.dv_create("leads", emailaddress1="case@example.com", lastname="Case", subject="s")

    assert world.run("dynamics365_to_activecampaign").state == "success"
    contact = world.ac_by_email("case@example.com")
    assert sorted(contact["tags"]) == ["D365: Pushed from Dynamics", "d365: lead"]
    names = [t["tag"] for t in world._ac("GET", "tags", params={"limit": 100})["tags"]]
    assert sorted(n.lower() for n in names if n.lower() == "d365: lead") == ["d365: lead"]

    # ActiveCampaign -> Dynamics reads the variant as the lead tag too.
    world.ac_update(contact["id"], firstName="Cased")
    assert world.run("activecampaign_to_dynamics365").state == "success"
    (lead,) = world.dv_rows("leads")
    assert lead["firstname"] == "Cased"
