"""Workers SIGKILLed at random points (issue 9, item 4): during extract, during load, inside the
other tasks and between tasks; then the run is retried, as Airflow retries the task whose worker
died (same run, same staging) or as the next run picks up. After every round both systems and
the state store must equal the undisturbed run's: nothing lost, nothing created twice.

The batches carry accounts, contacts on them and opportunities (`objects.Companies`). In every
other round the first worker is killed in one of their writes (an AC account, association or
deal create towards AC; a Dynamics account create or a contact's account towards Dynamics), each
in turn: after the server wrote it and before the sync read the answer (the worker holds the
answer, `tests.reliability.workerhost`)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.world import World
from tests.reliability import objects
from tests.reliability.conftest import BATCH, SOAK, Figures
from tests.reliability.harness import (
    AC_TO_D365,
    CONFIRMED,
    D365_TO_AC,
    DIRECTIONS,
    TASKS,
    Attempt,
    Scenario,
    Snapshot,
    WorkerHost,
    assert_converged,
    faults_pending,
    run_dag,
    snapshot,
    start_attempt,
    wait_until,
    write_requests,
)
from tests.reliability.test_faults import WRITES

pytestmark = [pytest.mark.sandbox, pytest.mark.e2e]

# Kill points per direction: half on each state store backend.
KILLS = 60 if SOAK else 20
ROUNDS = 16 if SOAK else 8
ATTEMPTS_PER_ROUND = 3
# The scheduler's hand-off between two tasks; a kill may land there.
GAP = 0.25
HOLD = 1.0


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: `after` requests answered since `task` started, `delay` seconds into a
    task, right after a task finished (`between`), or (`held`) while the direction's contact
    write is held at the server, or, with `target` (service, path prefix, method), after the
    server wrote that object write while the worker holds its answer."""

    task: str
    kind: str
    after: int = 0
    delay: float = 0.0
    target: tuple[str, str, str] | None = None

    def describe(self) -> str:
        if self.kind == "requests":
            return f"during {self.task}, after {self.after} API calls"
        if self.kind == "delay":
            return f"during {self.task}, {self.delay:.2f} s in"
        if self.kind == "held" and self.target is not None:
            return f"during {self.task}, after the server wrote {self.write}, answer held"
        if self.kind == "held":
            return f"during {self.task}, while a write is held at the server"
        return f"between {self.task} and the next task"

    @property
    def write(self) -> str:
        """The object write, e.g. `POST /api/3/deals`."""
        assert self.target is not None
        return f"{self.target[2]} {self.target[1]}"


def choose(rng: random.Random, tasks: list[str]) -> KillPoint:
    """A random kill point among `tasks` (extract and load weigh most: they talk to the APIs)."""
    task = rng.choices(tasks, weights=[3 if t in ("extract", "load") else 1 for t in tasks])[0]
    kind = rng.choice(["between", "work"]) if task != "load" else "work"
    if kind == "between":
        return KillPoint(task, "between")
    if task == "extract":
        return KillPoint(task, "requests", after=rng.randint(1, 10))
    if task == "load":
        if rng.random() < 0.35:
            return KillPoint(task, "held")
        return KillPoint(task, "requests", after=rng.randint(1, 4))
    return KillPoint(task, "delay", delay=rng.uniform(0.0, 0.2))


def object_point(direction: str, backend: str, round_no: int) -> KillPoint | None:
    """The object write the first worker of the round is killed in, every other round: each
    create and association write of the direction in turn, starting elsewhere per backend (so
    that both backends together kill in every one of them)."""
    if round_no % 2 == 0:
        return None
    targets = objects.KILL_WRITES[direction]
    shift = 0 if backend == "sqlite" else 2
    return KillPoint("load", "held", target=targets[(round_no // 2 + shift) % len(targets)])


def _answered(world: World) -> int:
    return int(world.counters("ac")["total"]) + int(world.counters("d365")["total"])


def _clear_faults(world: World) -> None:
    for service in ("ac", "d365"):
        world.sandbox.admin(service, "DELETE", "faults")


def answers_for(point: KillPoint) -> list[dict[str, Any]]:
    """What the worker must do for `point`: hold the answer of its object write (the server has
    written it) long enough to be killed before the sync reads it."""
    if point.target is None:
        return []
    _, prefix, method = point.target
    return [{"method": method, "path_prefix": prefix, "count": 1, "then": "hold", "seconds": 5}]


def kill_at(world: World, attempt: Attempt, point: KillPoint, direction: str) -> str | None:
    """Kill `attempt` at `point`; the task it was in when it died, or None if it finished.
    An object write's point must have been given to the worker (`answers_for`)."""
    held_at_server = point.kind == "held" and point.target is None
    if held_at_server:
        # Held before the server reads it: the sandbox drops a request whose client is gone,
        # so this write is lost with the worker (the object writes are held after it is done).
        service, path = WRITES[direction]
        spec = {"kind": "latency", "seconds": HOLD, "count": 1, "path_prefix": path}
        world.sandbox.admin(service, "POST", "faults", json=spec)
    base: int | None = None
    started: float | None = None
    while attempt.alive():
        where = attempt.current()
        if where == ("start", point.task):
            if base is None:
                base, started = _answered(world), time.monotonic()
            if point.kind == "requests" and _answered(world) - base >= point.after:
                break
            if point.kind == "delay" and time.monotonic() - (started or 0) >= point.delay:
                break
            if held_at_server and not faults_pending(world, WRITES[direction][0]):
                break
            if point.kind == "held" and point.target is not None and attempt.held():
                break
        elif (
            where is not None
            and where[0] == "done"
            and TASKS.index(where[1]) >= TASKS.index(point.task)
        ):
            # The task ended before the point was reached: kill in the hand-off after it.
            break
        time.sleep(0.01)
    else:
        attempt.wait()
        if held_at_server:
            _clear_faults(world)  # a hold the run never reached
        return None
    attempt.kill()
    where = attempt.current()
    if held_at_server:
        time.sleep(HOLD + 0.2)  # the abandoned request reaches the server; a retry comes later
        _clear_faults(world)
    if where == ("done", attempt.tasks[-1]):
        return None
    return f"{where[0]} {where[1]}" if where else "start extract"


def _killed_task(where: str) -> str:
    """The task a retry of the same run starts with."""
    state, task = where.split(" ", 1)
    return task if state == "start" else TASKS[TASKS.index(task) + 1]


def run_round(
    world: World,
    host: WorkerHost,
    direction: str,
    run_dir: Path,
    rng: random.Random,
    round_no: int,
    record: Callable[[dict[str, Any]], None],
    first: KillPoint | None = None,
) -> int:
    """Kill up to ATTEMPTS_PER_ROUND workers of this round's run (the first at `first` when
    given, the others at random), then let it finish."""
    kills = 0
    run_no = 0
    run_id = f"r{round_no}-run{run_no}"
    tasks = list(TASKS)
    for attempt_no in range(ATTEMPTS_PER_ROUND):
        point = first if attempt_no == 0 and first is not None else choose(rng, tasks)
        attempt = start_attempt(
            host, direction, run_id, run_dir / run_id, tasks=tasks, params=CONFIRMED, gap=GAP,
            answers=answers_for(point),
        )  # fmt: skip
        died_in = kill_at(world, attempt, point, direction)
        if died_in is None:
            return kills
        kills += 1
        same_run = rng.random() < 0.6 and _killed_task(died_in) != "extract"
        record(
            {
                "round": round_no,
                "attempt": attempt_no,
                "point": point.describe(),
                "object write": point.write if point.target else None,
                "died in": died_in,
                "then": "task retried (same run)" if same_run else "new run",
            }
        )
        if same_run:
            tasks = list(TASKS[TASKS.index(_killed_task(died_in)) :])
        else:
            run_no += 1
            run_id, tasks = f"r{round_no}-run{run_no}", list(TASKS)
    start_attempt(
        host, direction, run_id, run_dir / run_id, tasks=tasks, params=CONFIRMED, gap=0
    ).wait()
    return kills


@pytest.mark.parametrize("state_backend", ["sqlite", "postgres"], indirect=True)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_killed_workers_lose_nothing_and_create_nothing_twice(
    direction: str,
    state_backend: str,
    world: World,
    baseline: Callable[..., list[Snapshot]],
    worker_host: WorkerHost,
    figures: Figures,
    tmp_path: Path,
) -> None:
    rng = random.Random(f"{direction}/{state_backend}")
    scenario = Scenario(direction, BATCH, objects=True)
    expected = baseline(scenario, ROUNDS)
    scenario.prepare(world)
    target = KILLS // 2
    kills: list[dict[str, Any]] = []
    round_no = 0
    while len(kills) < target:
        assert round_no < ROUNDS, f"only {len(kills)} kills landed in {ROUNDS} rounds"
        scenario.change(world, round_no)
        first = object_point(direction, state_backend, round_no)
        run_round(world, worker_host, direction, tmp_path, rng, round_no, kills.append, first)
        try:
            assert_converged(snapshot(world), expected[round_no])
        except AssertionError as error:
            last = [k for k in kills if k["round"] == round_no]
            raise AssertionError(f"round {round_no} after kills {last}: {error}") from None
        round_no += 1
    # One more run changes nothing: no write is pending or repeated.
    before = write_requests(world)
    run_dag(world, direction, **CONFIRMED)
    assert write_requests(world) == before
    by_task = Counter(k["died in"] for k in kills)
    figures.add(
        matrix="kills",
        item=4,
        direction=direction,
        backend=state_backend,
        kills=len(kills),
        rounds=round_no,
        died_in=dict(by_task),
        retried_same_run=sum(k["then"].startswith("task") for k in kills),
        object_writes=dict(Counter(k["object write"] for k in kills if k["object write"])),
        duplicates=0,
        lost=0,
    )


@pytest.mark.parametrize("state_backend", ["postgres"], indirect=True)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_airflow_dags_test_killed_during_load_then_rerun(
    direction: str,
    world: World,
    baseline: Callable[..., list[Snapshot]],
    figures: Figures,
) -> None:
    """The same, through Airflow's own CLI process: `airflow dags test` SIGKILLed while its
    load's first write is held at the server, then the next run."""
    scenario = Scenario(direction, BATCH, objects=True)
    expected = baseline(scenario, ROUNDS)
    scenario.prepare(world)
    scenario.change(world, 0)
    service, path = WRITES[direction]
    world.sandbox.admin(
        service, "POST", "faults",
        json={"kind": "latency", "seconds": 3, "count": 1, "path_prefix": path},
    )  # fmt: skip
    airflow = Path(sys.executable).with_name("airflow")
    process = subprocess.Popen(
        [str(airflow), "dags", "test", direction, "-c", '{"confirm_mass_change": true}'],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: not faults_pending(world, service),
            timeout=240,
            what="the load's first write",
        )
        assert process.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    time.sleep(3.5)
    run_dag(world, direction, **CONFIRMED)
    assert_converged(snapshot(world), expected[0])
    figures.add(matrix="kills-cli", item=4, direction=direction, kills=1, duplicates=0, lost=0)


# Kills pinned to one object write, in the first round of the matrix's batch (whose undisturbed
# rounds are computed once for both): (direction, write, then Airflow's retry of `load` or the
# next run). The matrix above kills in each object write too, but follows with either at random.
PINNED = [
    (D365_TO_AC, objects.KILL_WRITES[D365_TO_AC][0], "task retried"),  # POST /api/3/accounts
    (D365_TO_AC, objects.KILL_WRITES[D365_TO_AC][2], "task retried"),  # POST /api/3/deals
    (AC_TO_D365, objects.KILL_WRITES[AC_TO_D365][0], "new run"),  # POST .../accounts
    (AC_TO_D365, objects.KILL_WRITES[AC_TO_D365][1], "task retried"),  # PATCH .../contacts(
]


@pytest.mark.parametrize("state_backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("direction", "target", "then"),
    PINNED,
    ids=[
        f"to_{d.split('_to_')[1]}-{t[2]} {t[1].rsplit('/', 1)[1]}-{then.split()[0]}"
        for d, t, then in PINNED
    ],
)
def test_a_load_killed_in_an_object_write_then_run_again_creates_nothing_twice(
    direction: str,
    target: tuple[str, str, str],
    then: str,
    world: World,
    baseline: Callable[..., list[Snapshot]],
    worker_host: WorkerHost,
    tmp_path: Path,
) -> None:
    """The worker is killed after the server wrote `target` and before the sync read the answer;
    then Airflow retries `load` in the same run, or the next run starts: every account,
    association, deal and link is as after the undisturbed run, each once."""
    scenario = Scenario(direction, BATCH, objects=True)
    expected = baseline(scenario, ROUNDS)
    scenario.prepare(world)
    scenario.change(world, 0)
    point = KillPoint("load", "held", target=target)
    attempt = start_attempt(
        worker_host, direction, "r0-run0", tmp_path / "r0-run0", params=CONFIRMED, gap=GAP,
        answers=answers_for(point),
    )  # fmt: skip
    assert kill_at(world, attempt, point, direction) == "start load", f"{point.write} never sent"
    run_id, tasks = ("r0-run0", ["load"]) if then == "task retried" else ("r0-run1", list(TASKS))
    start_attempt(
        worker_host, direction, run_id, tmp_path / run_id, tasks=tasks, params=CONFIRMED, gap=0
    ).wait()
    assert_converged(snapshot(world), expected[0])
