"""Reliability harness: forked DAG workers to kill, scenarios per direction, normalised snapshots."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from crm_sync.state import StateStore

from tests.e2e.world import World
from tests.reliability import objects

AC_TO_D365 = "activecampaign_to_dynamics365"
D365_TO_AC = "dynamics365_to_activecampaign"
BACKFILL = "initial_sync_backfill"
DIRECTIONS = (AC_TO_D365, D365_TO_AC)
TASKS = ("extract", "tag_classify", "map_fields", "validate", "load")
# Phase B runs change more than safety.max_change_share of the linked records in soak sizes.
CONFIRMED = {"confirm_mass_change": True}

PROJECT_ROOT = Path(__file__).resolve().parents[2]


# -- killable workers -------------------------------------------------------------------------
class WorkerHost:
    """The `tests.reliability.workerhost` process: forks workers that run a DAG's tasks."""

    def __init__(self, log: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.workerhost"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            cwd=PROJECT_ROOT,
            text=True,
        )
        self.ask_ready()

    def ask_ready(self) -> None:
        answer = self._read()
        assert answer.get("ready"), answer

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the worker host exited")
        return json.loads(line)

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(30)


def run_env() -> dict[str, str]:
    """This test's connections, staging and settings, for a worker."""
    return {k: v for k, v in os.environ.items() if k.startswith(("AIRFLOW_CONN_", "CRM_SYNC_"))}


@dataclass
class Attempt:
    """One worker running some tasks of a DAG run; it can be SIGKILLed at any moment."""

    host: WorkerHost
    dag_id: str
    run_id: str
    run_dir: Path
    pid: int
    tasks: list[str]

    def progress(self) -> list[str]:
        """`start <task>` / `done <task>` lines written so far."""
        path = self.run_dir / "progress"
        return path.read_text().splitlines() if path.exists() else []

    def current(self) -> tuple[str, str] | None:
        """The last progress line as (`start`|`done`, task)."""
        lines = self.progress()
        if not lines:
            return None
        what, _, task = lines[-1].partition(" ")
        return what, task

    def held(self) -> list[str]:
        """The writes whose answer the worker holds or held (`answers` with `then: hold`)."""
        path = self.run_dir / f"held-{self.pid}"
        return path.read_text().splitlines() if path.exists() else []

    def answers(self) -> list[str]:
        """`lose|hold <method> <path>` for each answer lost or held so far."""
        path = self.run_dir / f"answers-{self.pid}"
        return path.read_text().splitlines() if path.exists() else []

    def alive(self) -> bool:
        """Whether the worker still runs."""
        return bool(self.host.call(op="wait", pid=self.pid, timeout=0).get("timeout"))

    def kill(self) -> dict[str, Any]:
        """SIGKILL: no cleanup, no `finally`; open transactions and sockets simply vanish."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        return self.host.call(op="wait", pid=self.pid, timeout=30)

    def wait(self, timeout: float = 600.0) -> None:
        """Wait for the worker and require that every task succeeded."""
        answer = self.host.call(op="wait", pid=self.pid, timeout=timeout)
        if answer.get("exit") != 0:
            logs = "\n".join(p.read_text()[-3000:] for p in self.run_dir.glob("worker-*.log"))
            raise AssertionError(f"{self.dag_id} {self.tasks} failed: {answer}\n{logs}")


def start_attempt(
    host: WorkerHost,
    dag_id: str,
    run_id: str,
    run_dir: Path,
    *,
    tasks: list[str] | None = None,
    params: dict[str, Any] | None = None,
    gap: float = 0.1,
    answers: list[dict[str, Any]] | None = None,
) -> Attempt:
    """Start a worker for `tasks` (default: all five) of run `run_id`. `answers`: successful
    writes whose answer the worker loses or holds (see `tests.reliability.workerhost`)."""
    chosen = list(tasks or TASKS)
    answer = host.call(
        op="run",
        dag_id=dag_id,
        run_id=run_id,
        tasks=chosen,
        params=params or {},
        env=run_env(),
        run_dir=str(run_dir),
        gap=gap,
        answers=answers or [],
    )
    return Attempt(host, dag_id, run_id, run_dir, int(answer["pid"]), chosen)


def finish(attempt: Attempt, retries: int = 1, params: dict[str, Any] | None = None) -> int:
    """Wait for `attempt`; when a task failed, retry it in the same run as Airflow does (the
    DAGs have `retries`), at most `retries` times. Returns the task retries it took."""
    for used in range(retries + 1):
        try:
            attempt.wait()
            return used
        except AssertionError:
            where = attempt.current()
            if used == retries or where is None:
                raise
            state, task = where
            failed = task if state == "start" else TASKS[TASKS.index(task) + 1]
            attempt = start_attempt(
                attempt.host, attempt.dag_id, attempt.run_id, attempt.run_dir,
                tasks=list(TASKS[TASKS.index(failed) :]), params=params,
            )  # fmt: skip
    return retries


def run_dag(world: World, dag_id: str, **conf: Any) -> None:
    """Run a real DAG in this process with `dag.test()` and require success."""
    run = world.run(dag_id, **conf)
    assert run.state == "success", f"{dag_id} ended {run.state}"


def write_requests(world: World) -> int:
    """Write requests both emulators have answered (token requests left out)."""
    return sum(
        row["count"]
        for service in ("ac", "d365")
        for row in world.counters(service)["requests"]
        if row["method"] in ("POST", "PUT", "PATCH", "DELETE") and "/token" not in row["path"]
    )


def faults_pending(world: World, service: str) -> bool:
    """Whether injected faults still wait for a request on `service`."""
    response = requests.get(
        f"{world.sandbox.ac_url if service == 'ac' else world.sandbox.d365_url}/_sandbox/faults",
        verify=world.sandbox.ca_path,
        timeout=30,
    )
    response.raise_for_status()
    return bool(response.json()["faults"])


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 20 ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


# -- scenarios --------------------------------------------------------------------------------
FIRST = ["Ann", "José", "Łukasz", "Mei", "Olu", "Siobhán", "Nguyễn", "Zoë", "Ray", "Ida", "Bo"]
LAST = ["Lee", "O'Brien", "Müller", "Okafor", "Smith-Jones", "Tanaka", "García", "Kowalski"]
JOBS = ("Engineer", "Director", "Chief Happiness Officer")
# Indices of the records each scenario quarantines on purpose (far above any batch).
SPECIAL = 900_000


@dataclass(frozen=True)
class Person:
    """One deterministic test person."""

    index: int
    first: str
    last: str
    email: str

    @property
    def table(self) -> str:
        """Three in five are leads, the rest contacts."""
        return "leads" if self.index % 5 < 3 else "contacts"


def person(index: int, seed: int) -> Person:
    """The `index`-th person of a seeded population (emails unique, some in mixed case)."""
    first = FIRST[(index * 7 + seed) % len(FIRST)]
    last = LAST[(index * 5 + seed * 3) % len(LAST)]
    slug = unicodedata.normalize("NFKD", last).encode("ascii", "ignore").decode().lower()
    email = f"p{seed}.{index:06d}.{slug.replace(chr(39), '')}@example.com"
    if index % 5 == 2:
        email = email.title()
    return Person(index, first, last, email)


@dataclass
class Scenario:
    """A realistic batch in one direction, in rounds.

    `prepare` creates the first `size` records and syncs them undisturbed. Each round then
    changes both systems (new records, updates, records that must be quarantined or leave the
    quarantine) for the next run of the direction to move: the disturbed run under test.
    """

    direction: str
    size: int
    seed: int = 1
    # Accounts, contacts on them and opportunities next to the contacts (`objects.Companies`).
    objects: bool = False
    ids: dict[str, str] = field(default_factory=dict)
    people: list[Person] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.companies = objects.Companies(self.direction, self.seed) if self.objects else None

    @property
    def new(self) -> int:
        """Records created per round."""
        return max(10, self.size // 2)

    def prepare(self, world: World) -> None:
        """Create the first records and sync them (undisturbed)."""
        if self.direction == AC_TO_D365:
            self._prepare_ac(world)
        else:
            self._prepare_dv(world)
        if self.companies is not None:
            self.companies.prepare(world)
        run_dag(world, self.direction, **CONFIRMED)

    def change(self, world: World, round_no: int = 0) -> None:
        """One round of changes that the next run of the direction moves."""
        if self.direction == AC_TO_D365:
            self._change_ac(world, round_no)
        else:
            self._change_dv(world, round_no)
        if self.companies is not None:
            self.companies.change(world, round_no)

    def _fresh(self, round_no: int) -> list[Person]:
        start = self.size + round_no * self.new
        return [person(i, self.seed) for i in range(start, start + self.new)]

    def _touched(self, round_no: int, modulo: int, shift: int) -> list[Person]:
        return [p for p in self.people if p.index % modulo == (round_no + shift) % modulo]

    # ActiveCampaign -> Dynamics 365
    def _ac_contact(self, world: World, who: Person, *, last: str | None = "") -> str:
        custom = {}
        if who.index % 3 == 0:
            custom["COMPANY"] = f"Company {who.index % 7}"
        if who.index % 4 != 1:
            custom["JOB_TITLE"] = JOBS[who.index % 3]
        contact_id = world.ac_contact(
            who.email, who.first, who.last if last == "" else last, **custom
        )
        if who.index % 2 == 0:
            world.ac_update(contact_id, phone=f"+44 20 7946 {who.index % 10_000:04d}")
        self.ids[who.email] = contact_id
        return contact_id

    def _queue(self, world: World, people: list[Person]) -> None:
        leads = [self.ids[p.email] for p in people if p.table == "leads"]
        contacts = [self.ids[p.email] for p in people if p.table == "contacts"]
        if leads:
            world.automation(leads, "lead")
        if contacts:
            world.automation(contacts, "contact")

    def _prepare_ac(self, world: World) -> None:
        people = [person(i, self.seed) for i in range(self.size)]
        for who in people:
            self._ac_contact(world, who)
        # Dynamics already holds three of them: they are linked by email, never duplicated.
        for who in people[1:4]:
            extra = {"subject": "Trade fair"} if who.table == "leads" else {}
            world.dv_create(who.table, emailaddress1=who.email.upper(), lastname=who.last, **extra)
        self._queue(world, people)
        self.people += people

    def _change_ac(self, world: World, round_no: int) -> None:
        for who in self._touched(round_no, 4, 0):
            world.ac_update(self.ids[who.email], firstName=f"{who.first} R{round_no}")
        for who in self._touched(round_no, 6, 1):
            world.ac_update(self.ids[who.email], phone=f"+1 555 01{who.index % 10_000:04d}")
        fresh = self._fresh(round_no)
        for who in fresh:
            self._ac_contact(world, who)
        self._queue(world, fresh)
        self.people += fresh
        both, nameless = person(SPECIAL, self.seed), person(SPECIAL + 1, self.seed)
        if round_no == 0:
            # Quarantined: both type tags; no last name (Dynamics requires one).
            world.automation([self._ac_contact(world, both)], "lead")
            world.ac_tag(self.ids[both.email], "D365: Contact")
            world.automation([self._ac_contact(world, nameless, last=None)], "lead")
        elif round_no == 1:
            # Fixed in ActiveCampaign: it leaves the quarantine and syncs.
            world.ac_update(self.ids[nameless.email], lastName="Fixed")

    # Dynamics 365 -> ActiveCampaign
    def _dv_row(self, world: World, who: Person, email: str | None = None) -> str:
        row: dict[str, Any] = {
            "emailaddress1": email or who.email,
            "firstname": who.first,
            "lastname": who.last,
        }
        if who.index % 4 != 1:
            row["jobtitle"] = JOBS[who.index % 3]
        if who.index % 2 == 0:
            row["telephone1"] = f"+44 20 7946 {who.index % 10_000:04d}"
        if who.table == "leads":
            row["subject"] = "Web form"
            if who.index % 3 == 0:
                row["companyname"] = f"Company {who.index % 7}"
        row_id = world.dv_create(who.table, **row)
        self.ids[who.email] = row_id
        return row_id

    def _prepare_dv(self, world: World) -> None:
        people = [person(i, self.seed) for i in range(self.size)]
        # ActiveCampaign already holds three of them: linked and tagged, never duplicated.
        for who in people[1:4]:
            world.ac_contact(who.email.upper(), "Known", who.last)
        for who in people:
            self._dv_row(world, who)
        self.people += people

    def _change_dv(self, world: World, round_no: int) -> None:
        qualified = next(p for p in self.people if p.index >= 5 and p.table == "leads")
        for who in self._touched(round_no, 4, 0):
            if who != qualified or round_no == 0:
                world.dv_update(
                    who.table, self.ids[who.email], firstname=f"{who.first} R{round_no}"
                )
        for who in self._touched(round_no, 6, 1):
            if who != qualified:
                world.dv_update(who.table, self.ids[who.email], jobtitle=f"Head of R{round_no}")
        fresh = self._fresh(round_no)
        for who in fresh:
            self._dv_row(world, who)
        self.people += fresh
        broken = person(SPECIAL, self.seed)
        if round_no == 0:
            # A lead qualified into a contact: the AC contact's tag moves to D365: Contact.
            world.qualify(self.ids[qualified.email])
            # Quarantined: an invalid email; the same email twice in one batch.
            self._dv_row(world, broken, email="not-an-email")
            self._dv_row(world, person(SPECIAL + 1, self.seed), email="twin@example.com")
            self._dv_row(world, person(SPECIAL + 2, self.seed), email="Twin@Example.com")
        elif round_no == 1:
            # Fixed in Dynamics: it leaves the quarantine and syncs.
            world.dv_update(broken.table, self.ids[broken.email], emailaddress1=broken.email)


# -- snapshots ---------------------------------------------------------------------------------
AC_KEYS = ("firstName", "lastName", "phone")
DV_KEYS = ("firstname", "lastname", "telephone1", "companyname", "jobtitle", "subject", "statecode")


@dataclass
class Snapshot:
    """Both systems and the state store, keyed by email so that two runs compare."""

    ac: dict[str, Any]
    dv: dict[str, Any]
    links: dict[str, Any]
    quarantine: dict[str, tuple[str, ...]]
    duplicates: list[str]
    # Write requests the run that led here sent (set by the baseline).
    writes: int = 0
    # Accounts, contact-account associations, deals and their links (`objects.state`).
    objects: dict[str, Any] = field(default_factory=dict)

    def differences(self, expected: Snapshot) -> list[str]:
        """What differs from `expected`, one line per key.

        A link's last item says whether it knows its AC contact's id. A run after a kill may
        learn an id the undisturbed run leaves to a later run (it finds by email the contact the
        killed import created, and keeps the id it found): knowing it early is no difference.
        Lacking an id the undisturbed run knows, or holding another contact's, is (the first
        item is the email of the contact the id names)."""
        lines = []
        for part in ("ac", "dv", "links", "quarantine", "objects"):
            mine, theirs = getattr(self, part), getattr(expected, part)
            for key in sorted(set(mine) | set(theirs)):
                got, want = mine.get(key), theirs.get(key)
                if part == "links" and got and want and got[:-1] == want[:-1] and got[-1]:
                    continue
                if got != want:
                    lines.append(f"{part}[{key}]: got {got!r}, want {want!r}")
        return lines


def _email(value: Any) -> str:
    return str(value or "").strip().lower()


def snapshot(world: World) -> Snapshot:
    """The current state of both systems and the state store, normalised by email."""
    ac: dict[str, Any] = {}
    ac_email = {}
    for contact in world.ac_contacts():
        key = _email(contact["email"])
        ac_email[contact["id"]] = key
        row = (
            *(contact.get(k) or "" for k in AC_KEYS),
            tuple(sorted(contact["tags"])),
            tuple(sorted((k, v) for k, v in contact["fields"].items() if v)),
        )
        ac[key] = tuple(sorted((*ac.get(key, ()), row)))
    dv: dict[str, Any] = {}
    dv_email = {}
    for table in ("leads", "contacts"):
        for record in world.dv_rows(table):
            key = f"{table}:{_email(record['emailaddress1'])}"
            dv_email[record.get("leadid") or record.get("contactid")] = key
            row = tuple(str(record.get(k) or "") for k in DV_KEYS if k in record)
            dv[key] = tuple(sorted((*dv.get(key, ()), row)))
    duplicates = sorted(k for part in (ac, dv) for k, rows in part.items() if len(rows) > 1)
    store = StateStore.from_url(world.state_url)
    links = {}
    for link in store.all_links():
        key = f"{link.entity}:{dv_email.get(link.dataverse_id, link.dataverse_id)}"
        links[key] = (
            ac_email.get(link.ac_contact_id or "", link.email),
            link.origin,
            tuple(sorted(link.synced_values.items())),
            link.ac_contact_id is not None,
        )
    things = objects.state(world, store, ac_email, dv_email)
    quarantine: dict[str, tuple[str, ...]] = {}
    for entry in store.open_quarantine():
        kind, _, raw = entry.record_key.partition(":")
        who = ac_email.get(raw) if kind == "ac" else dv_email.get(raw)
        key = f"{entry.direction}:{things.labels.get(entry.record_key) or who or entry.record_key}"
        quarantine[key] = tuple(sorted((*quarantine.get(key, ()), entry.reason_code)))
    store.engine.dispose()
    duplicates = sorted([*duplicates, *things.duplicates])
    return Snapshot(ac, dv, links, quarantine, duplicates, objects=things.parts)


def assert_converged(actual: Snapshot, expected: Snapshot) -> None:
    """Same records, each exactly once, same values, same links and quarantine."""
    assert actual.duplicates == expected.duplicates, f"duplicates: {actual.duplicates}"
    differences = actual.differences(expected)
    assert not differences, "differs from the undisturbed run:\n" + "\n".join(differences[:40])
