"""Property: random sequences of real-world changes on both sides never break the identity model.

Hypothesis draws sequences of creates, email changes (own aliases, case variants, another
linked record's email), second records with a linked email, deletes, tag changes and a lost
state store, applied to the sandbox as users would; then the real DAG task callables of both
directions run (the flows, hooks, state store and emulators are the real ones; only Airflow's
scheduler is left out). After every run:

1. each link is one-to-one (Dataverse row, AC contact, email);
2. no record's values are replaced by another person's: every record carries the person token
   it was created with (a lost state store is the one boundary: with no link left, the email is
   the only identity there is, so tokens are learned again);
3. after both directions ran, every record not in sync is quarantined with a reason, or not
   eligible by its tags (or its linked record was deleted, which issue 16 detects);
4. no run fails because of one record.

`make test` runs a fixed set of examples (derandomized, so CI is repeatable); `make soak`
(CRM_SYNC_SOAK=1) draws more and longer sequences at random, on both state-store backends.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st

from tests.conftest import Sandbox
from tests.e2e.world import DAGS_FOLDER, World, wired_world

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

SOAK = os.environ.get("CRM_SYNC_SOAK") == "1"
TO_AC = "dynamics365_to_activecampaign"
TO_D365 = "activecampaign_to_dynamics365"
PERSONS = 4
TYPE_TAGS = {"lead": "D365: Lead", "contact": "D365: Contact"}
ORIGIN_TAGS = {"D365: Pulled from ActiveCampaign", "D365: Pushed from Dynamics"}

case = st.sampled_from(["lower", "upper", "title"])
person = st.integers(0, PERSONS - 1)
alias = st.sampled_from("ab")
pick = st.integers(0, 50)
OPERATIONS = st.one_of(
    st.tuples(st.just("dv_new"), st.sampled_from(["leads", "contacts"]), person, alias, case),
    st.tuples(st.just("ac_new"), st.sampled_from(["lead", "contact"]), person, alias, case),
    st.tuples(st.just("dv_email"), pick, alias, case),
    st.tuples(st.just("ac_email"), pick, alias, case),
    st.tuples(st.just("dv_claim"), pick, pick, case),
    st.tuples(st.just("dv_second"), st.sampled_from(["leads", "contacts"]), pick, case),
    st.tuples(st.just("dv_name"), pick),
    st.tuples(st.just("ac_name"), pick),
    st.tuples(st.just("dv_delete"), pick),
    st.tuples(st.just("ac_delete"), pick),
    st.tuples(st.just("ac_retag"), pick, st.sampled_from(["untype", "both"])),
    st.tuples(st.just("lose_state")),
    st.tuples(st.just("run"), st.sampled_from([TO_AC, TO_D365])),
    st.tuples(st.just("sync"), st.sampled_from([(TO_D365, TO_AC), (TO_AC, TO_D365)])),
)
SEQUENCES = st.lists(OPERATIONS, min_size=4, max_size=24 if SOAK else 14).map(
    lambda ops: [*ops, ("sync", (TO_D365, TO_AC))]
)


def email(who: int, which: str, style: str) -> str:
    address = f"p{who}.{which}@example.com"
    return {"lower": address, "upper": address.upper(), "title": address.title()}[style]


def subject(table: str) -> dict[str, str]:
    """Leads need a topic; contacts have none."""
    return {"subject": "s"} if table == "leads" else {}


def token(record: dict[str, Any]) -> str | None:
    """The person a record stands for: the `P<n>` in its last name."""
    last = record.get("lastname") or record.get("lastName") or ""
    return last.split("-")[0] or None


@dataclass
class Model:
    """What the test did, and what it has seen of each record's person."""

    world: World
    dags: dict[str, Any]
    runs: itertools.count = field(default_factory=itertools.count)
    names: itertools.count = field(default_factory=itertools.count)
    tokens: dict[str, str] = field(default_factory=dict)
    strangers: itertools.count = field(default_factory=lambda: itertools.count(100))

    # -- the two systems as people change them ---------------------------------------------
    def dv_rows(self) -> list[tuple[str, dict[str, Any]]]:
        return [(t, r) for t in ("leads", "contacts") for r in self.world.dv_rows(t)]

    def ac_contacts(self) -> list[dict[str, Any]]:
        return self.world.ac_contacts()

    def store(self) -> Any:
        from crm_sync.state import StateStore

        return StateStore.from_url(self.world.state_url)

    def apply(self, op: tuple[Any, ...]) -> None:
        kind, *args = op
        try:
            getattr(self, f"_{kind}")(*args)
        except requests.HTTPError as error:
            # AC refuses a user's change to a taken email (422): a user could not make it either.
            if error.response is None or error.response.status_code != 422:
                raise

    def _dv_new(self, table: str, who: int, which: str, style: str) -> None:
        n = next(self.names)
        self.world.dv_create(
            table, emailaddress1=email(who, which, style), firstname=f"F{n}",
            lastname=f"P{who}-{n}", **subject(table),
        )  # fmt: skip

    def _ac_new(self, kind: str, who: int, which: str, style: str) -> None:
        n = next(self.names)
        contact = self.world.ac_contact(email(who, which, style), f"F{n}", f"P{who}-{n}")
        self.world.automation([contact], kind)

    def _dv_email(self, i: int, which: str, style: str) -> None:
        rows = self.dv_rows()
        if rows:
            table, row = rows[i % len(rows)]
            who = int(str(token(row))[1:])
            if who < PERSONS:  # a person moves between their own addresses
                self.world.dv_update(
                    table, row[f"{table[:-1]}id"], emailaddress1=email(who, which, style)
                )

    def _ac_email(self, i: int, which: str, style: str) -> None:
        contacts = self.ac_contacts()
        if contacts:
            contact = contacts[i % len(contacts)]
            who = int(str(token(contact))[1:])
            if who < PERSONS:
                self.world.ac_update(contact["id"], email=email(who, which, style))

    def _linked_email(self, j: int, style: str) -> str | None:
        links = self.store().all_links()
        if not links:
            return None
        address = sorted(link.email for link in links)[j % len(links)]
        return {"lower": address, "upper": address.upper(), "title": address.title()}[style]

    def _dv_claim(self, i: int, j: int, style: str) -> None:
        """A Dynamics record takes the email of a linked record (another person's)."""
        rows, taken = self.dv_rows(), self._linked_email(j, style)
        if rows and taken:
            table, row = rows[i % len(rows)]
            self.world.dv_update(table, row[f"{table[:-1]}id"], emailaddress1=taken)

    def _dv_second(self, table: str, j: int, style: str) -> None:
        """A second Dynamics record, of someone else, with a linked record's email."""
        taken = self._linked_email(j, style)
        if taken:
            n, who = next(self.names), next(self.strangers)
            self.world.dv_create(
                table, emailaddress1=taken, firstname=f"F{n}", lastname=f"P{who}-{n}",
                **subject(table),
            )  # fmt: skip

    def _dv_name(self, i: int) -> None:
        rows = self.dv_rows()
        if rows:
            table, row = rows[i % len(rows)]
            self.world.dv_update(table, row[f"{table[:-1]}id"], firstname=f"F{next(self.names)}")

    def _ac_name(self, i: int) -> None:
        contacts = self.ac_contacts()
        if contacts:
            contact = contacts[i % len(contacts)]
            self.world.ac_update(contact["id"], firstName=f"F{next(self.names)}")

    def _dv_delete(self, i: int) -> None:
        rows = self.dv_rows()
        if rows:
            table, row = rows[i % len(rows)]
            self.world._dv("DELETE", f"{table}({row[f'{table[:-1]}id']})")

    def _ac_delete(self, i: int) -> None:
        contacts = self.ac_contacts()
        if contacts:
            self.world._ac("DELETE", f"contacts/{contacts[i % len(contacts)]['id']}")

    def _ac_retag(self, i: int, how: str) -> None:
        contacts = [c for c in self.ac_contacts() if set(c["tags"]) & set(TYPE_TAGS.values())]
        if not contacts:
            return
        contact = contacts[i % len(contacts)]
        if how == "untype":
            for name in set(contact["tags"]) & set(TYPE_TAGS.values()):
                self.world.ac_untag(contact["id"], name)
        else:
            self.world.ac_tag(contact["id"], *TYPE_TAGS.values())

    def _lose_state(self) -> None:
        from crm_sync.state import metadata

        with self.store().begin() as connection:
            for table in reversed(metadata.sorted_tables):
                if table.name != "crm_sync_schema":
                    connection.execute(table.delete())
        self.tokens.clear()  # with no link left, the email is the only identity there is

    def _run(self, dag_id: str) -> None:
        self.run(dag_id)
        self.check(converged=False)

    def _sync(self, order: tuple[str, str]) -> None:
        for dag_id in order:
            self.run(dag_id)
        self.check(converged=True)

    # -- the DAG's own task callables, in order -----------------------------------------------
    def run(self, dag_id: str) -> None:
        dag = self.dags[dag_id]
        run_id = f"property__{next(self.runs)}"
        context = {
            "dag_run": SimpleNamespace(dag_id=dag_id, run_id=run_id, conf={}),
            "params": {name: param.value for name, param in dag.params.items()},
        }
        pushed: dict[str, Any] = {}
        for task_id in ("extract", "tag_classify", "map_fields", "validate", "load"):
            task = dag.get_task(task_id)
            upstream = [pushed[t] for t in task.upstream_task_ids]
            pushed[task_id] = task.python_callable(*upstream, **context)  # must not raise

    # -- the invariants ---------------------------------------------------------------------
    def check(self, *, converged: bool) -> None:
        links = self.store().all_links()
        rows = {f"{t[:-1]}:{r[f'{t[:-1]}id']}": r for t, r in self.dv_rows()}
        contacts = {f"ac:{c['id']}": c for c in self.ac_contacts()}

        # 1. one-to-one
        for what, values in (
            ("Dataverse row", [(link.entity, link.dataverse_id) for link in links]),
            ("AC contact", [link.ac_contact_id for link in links if link.ac_contact_id]),
            ("email", [link.email.lower() for link in links]),
        ):
            assert len(values) == len(set(values)), f"a {what} is in two links: {values}"

        # 2. every record keeps the person it stands for
        for key, record in {**rows, **contacts}.items():
            seen = self.tokens.setdefault(key, str(token(record)))
            assert token(record) == seen, f"{key} took another person's values ({seen} -> {record})"
        for link in links:
            row = rows.get(f"{link.entity}:{link.dataverse_id}")
            contact = contacts.get(f"ac:{link.ac_contact_id}")
            if row and contact:
                assert token(row) == token(contact), f"link {link} joins two people"

        if converged:
            self._check_converged(links, rows, contacts)

    def _check_converged(
        self, links: list[Any], rows: dict[str, Any], contacts: dict[str, Any]
    ) -> None:
        quarantined = {e.record_key for e in self.store().open_quarantine()}
        by_row = {f"{link.entity}:{link.dataverse_id}": link for link in links}
        by_contact = {f"ac:{link.ac_contact_id}": link for link in links if link.ac_contact_id}
        by_email = {c["email"].lower(): key for key, c in contacts.items()}

        def same(row: dict[str, Any], contact: dict[str, Any]) -> bool:
            return (
                (row.get("emailaddress1") or "").lower() == contact["email"].lower()
                and (row.get("firstname") or "") == (contact.get("firstName") or "")
                and (row.get("lastname") or "") == (contact.get("lastName") or "")
            )

        def valid_tags(contact: dict[str, Any], entity: str | None = None) -> bool:
            types = set(contact["tags"]) & set(TYPE_TAGS.values())
            wanted = {TYPE_TAGS[entity]} if entity else set(TYPE_TAGS.values())
            return len(types) == 1 and types <= wanted and bool(set(contact["tags"]) & ORIGIN_TAGS)

        for key, row in rows.items():
            link = by_row.get(key)
            contact_key = f"ac:{link.ac_contact_id}" if link and link.ac_contact_id else None
            if contact_key is None and link is not None:
                contact_key = by_email.get(link.email)
            contact = contacts.get(contact_key) if contact_key else None
            if contact is not None and same(row, contact):
                continue
            if key in quarantined or contact_key in quarantined:
                continue
            if contact is not None and not valid_tags(contact, key.split(":")[0]):
                continue  # not eligible: the AC contact's tags were removed or contradict
            raise AssertionError(f"{key} is neither in sync nor quarantined: {row} / {contact}")

        for key, contact in contacts.items():
            if not valid_tags(contact):
                continue  # not eligible by its tags (or quarantined as both_type_tags)
            link = by_contact.get(key)
            if link is None:
                link = next((x for x in links if x.email == contact["email"].lower()), None)
            row = rows.get(f"{link.entity}:{link.dataverse_id}") if link else None
            if row is not None and same(row, contact):
                continue
            if key in quarantined or (link and f"{link.entity}:{link.dataverse_id}" in quarantined):
                continue
            if link is not None and row is None:
                continue  # its Dynamics record was deleted: detected by issue 16, not yet here
            raise AssertionError(f"{key} is neither in sync nor quarantined: {contact} / {row}")


@pytest.fixture(scope="module")
def dags() -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return dict(bag.dags)


@pytest.fixture(params=["sqlite", "postgres"] if SOAK else ["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


# Sequences that once broke an invariant, replayed first on every run (found by `make soak`).
FOUND = [
    # tag_classify crashed when no row of the run had its AC contact among those read
    [
        ("lose_state",),
        ("sync", (TO_D365, TO_AC)),
        ("dv_email", 26, "a", "lower"),
        ("dv_new", "leads", 0, "a", "lower"),
        ("dv_new", "leads", 0, "a", "lower"),
        ("dv_email", 36, "a", "lower"),
        ("ac_name", 25),
        ("run", TO_AC),
        ("dv_claim", 26, 38, "lower"),
        ("sync", (TO_AC, TO_D365)),
        ("dv_claim", 12, 10, "lower"),
        ("dv_new", "contacts", 2, "a", "upper"),
        ("dv_delete", 31),
        ("dv_email", 24, "a", "title"),
        ("sync", (TO_AC, TO_D365)),
        ("dv_delete", 28),
        ("sync", (TO_AC, TO_D365)),
        ("dv_name", 1),
        ("run", TO_AC),
        ("dv_new", "contacts", 2, "a", "upper"),
        ("dv_email", 24, "a", "title"),
        ("dv_name", 29),
        ("dv_delete", 24),
        ("sync", (TO_D365, TO_AC)),
    ],
]


@settings(
    max_examples=80 if SOAK else 25,
    derandomize=not SOAK,
    deadline=None,
    database=None,
    # Shrinking replays whole sequences against both APIs: in `make test` a failure reports the
    # sequence it drew; `make soak` shrinks it.
    phases=list(Phase) if SOAK else [Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=SEQUENCES)
@example(operations=FOUND[0])
def test_identity_invariants_hold_after_every_run(
    operations: list[tuple[Any, ...]],
    sandbox_env: Sandbox,
    dags: dict[str, Any],
    backend: str,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    sandbox_env.reset()
    folder = tmp_path_factory.mktemp("property")
    url = (
        f"sqlite:///{folder / 'state.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    if backend == "postgres":
        from crm_sync.state import StateStore, metadata

        with StateStore.from_url(url).begin() as connection:
            for table in reversed(metadata.sorted_tables):
                if table.name != "crm_sync_schema":
                    connection.execute(table.delete())
    model = Model(wired_world(sandbox_env, url, Path(folder), monkeypatch), dags)
    for op in operations:
        note(f"applying {op}")
        if os.environ.get("CRM_SYNC_PROPERTY_TRACE"):
            print(op, flush=True)
        model.apply(op)
