"""Query building (issue 9): OData `$filter`s and ActiveCampaign query parameters are built by
escaping and encoding helpers, so an injection attempt matches only its literal value."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from crm_connectors.activecampaign import ActiveCampaignHook
from crm_connectors.dynamics365 import Dynamics365Hook
from crm_connectors.odata import ODataFilterError
from crm_connectors.retry import RetryPolicy
from crm_sync.flows.dataverse import rows_by
from crm_sync.settings import Entity

from tests.conftest import PROJECT_ROOT, Sandbox
from tests.e2e.world import World

pytestmark = pytest.mark.sandbox

FAST = RetryPolicy(max_attempts=2, backoff_base=0.05, backoff_max=0.1)
ATTACK = "x' or 1 eq 1 or 'a"


@pytest.fixture
def world(sandbox_env: Sandbox) -> World:
    return World(sandbox_env, "sqlite://")


def test_odata_injection_matches_only_its_literal_value(world: World) -> None:
    for number, last in enumerate(["Lee", "Tanaka", ATTACK, "O'Hara"]):
        world.dv_create("leads", emailaddress1=f"n{number}@example.com", lastname=last, subject="s")
    world.dv_create("leads", emailaddress1="o'brien@example.com", lastname="Quote", subject="s")
    with Dynamics365Hook(retry_policy=FAST) as hook:

        def lastnames(column: str, *values: str) -> list[str]:
            rows = hook.find("leads", column, list(values), select=["lastname"])
            return sorted(r["lastname"] for r in rows)

        assert lastnames("lastname", ATTACK) == [ATTACK]
        assert lastnames("lastname", "O'Hara") == ["O'Hara"]
        assert lastnames("emailaddress1", "o'brien@example.com") == ["Quote"]
        assert lastnames("emailaddress1", "nobody@example.com' or lastname ne 'z") == []
        assert lastnames("lastname", "Lee') or (lastname ne 'z") == []
        # The sync's own lookup (by email, in chunks) goes through the same helpers.
        frame = rows_by(hook, Entity.LEAD, "emailaddress1", [ATTACK, "o'brien@example.com"], [])
        assert frame["dataverse_id"].size == 1
        # A filter pasted together from a value is refused before it is sent, not run.
        with pytest.raises(ODataFilterError):
            list(hook.query("leads", filter=f"lastname eq '{ATTACK}"))
        with pytest.raises(ODataFilterError):
            list(hook.query("leads", select=[f"lastname,{ATTACK}"]))


def test_activecampaign_parameters_match_only_their_literal_value(world: World) -> None:
    world.ac_contact("victim@example.com", "Vic", "Tim")
    world.ac_contact("other@example.com", "Oth", "Er")
    with ActiveCampaignHook(rate_limit=None, retry_policy=FAST) as hook:
        assert hook.find_contact_by_email("victim@example.com")["firstName"] == "Vic"
        for attempt in (
            "victim@example.com&email_like=%",
            "nobody@example.com&ids[]=1",
            "x@example.com#",
            "x@example.com?email=victim@example.com",
        ):
            assert hook.find_contact_by_email(attempt) is None, attempt
        assert hook.find_tag("D365: Lead&filters[search][eq]=") is None
        assert [c["email"] for c in hook.list_contacts(email="other@example.com")] == [
            "other@example.com"
        ]


# -- every filter and query string in the shipped code comes from the helpers -----------------
OPERATORS = (" eq ", " ne ", " gt ", " ge ", " lt ", " le ", "$filter")
HELPERS = {"literal", "column", "eq", "compare", "any_of", "all_of", "check_filter"}


def _hand_built(tree: ast.AST) -> list[int]:
    """Lines where an f-string or a `+`/`%` expression builds OData from a raw value, or a URL's
    query string is pasted together."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            values = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
            raw = [
                v
                for v in values
                if not (isinstance(v, ast.Call) and getattr(v.func, "id", None) in HELPERS)
            ]
            if raw and (any(op in text for op in OPERATORS) or ("?" in text and "=" in text)):
                lines.append(node.lineno)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
            for side in (node.left, node.right):
                text = side.value if isinstance(side, ast.Constant) else None
                if isinstance(text, str) and any(op in text for op in OPERATORS):
                    lines.append(node.lineno)
    return lines


def hand_built_queries(root: Path) -> list[str]:
    """Hand-built filters or query strings in dags/, include/ and plugins/ (the helpers' own
    module, `crm_connectors/odata.py`, is where literals are made)."""
    found = []
    for folder in ("dags", "include", "plugins"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.name == "odata.py":
                continue
            for line in _hand_built(ast.parse(path.read_text())):
                found.append(f"{path.relative_to(root)}:{line}")
    return found


def test_no_shipped_code_builds_a_filter_or_query_string_by_hand(tmp_path: Path) -> None:
    assert hand_built_queries(PROJECT_ROOT) == []
    # The check itself finds one.
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "lookup.py").write_text(
        "f = f\"emailaddress1 eq '{email}'\"\n"
        'ok = f"name eq {literal(name)}"\n'
        "url = f'/api/3/contacts?email={email}'\n"
        'g = "lastname eq \'" + name + "\'"\n'
    )
    assert hand_built_queries(tmp_path) == [
        "include/lookup.py:1",
        "include/lookup.py:3",
        "include/lookup.py:4",
    ]
