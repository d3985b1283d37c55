"""Workers SIGKILLed at random points (issue 9, item 4): during extract, during load, inside the
other tasks and between tasks; then the run is retried, as Airflow retries the task whose worker
died (same run, same staging) or as the next run picks up. After every round both systems and
the state store must equal the undisturbed run's: nothing lost, nothing created twice."""

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
from tests.reliability.conftest import BATCH, SOAK, Figures
from tests.reliability.harness import (
    CONFIRMED,
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
    task, right after a task finished (`between`), or while a write is held at the server."""

    task: str
    kind: str
    after: int = 0
    delay: float = 0.0

    def describe(self) -> str:
        if self.kind == "requests":
            return f"during {self.task}, after {self.after} API calls"
        if self.kind == "delay":
            return f"during {self.task}, {self.delay:.2f} s in"
        if self.kind == "held":
            return f"during {self.task}, while a write is held at the server"
        return f"between {self.task} and the next task"


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


def _answered(world: World) -> int:
    return int(world.counters("ac")["total"]) + int(world.counters("d365")["total"])


def kill_at(world: World, attempt: Attempt, point: KillPoint, direction: str) -> str | None:
    """Kill `attempt` at `point`; the task it was in when it died, or None if it finished."""
    if point.kind == "held":
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
            if point.kind == "held" and not faults_pending(world, WRITES[direction][0]):
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
        return None
    attempt.kill()
    where = attempt.current()
    if where == ("done", attempt.tasks[-1]):
        return None
    if point.kind == "held":
        time.sleep(HOLD + 0.2)  # the server finishes the abandoned write; a retry comes later
        for service in ("ac", "d365"):
            world.sandbox.admin(service, "DELETE", "faults")
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
) -> int:
    """Kill up to ATTEMPTS_PER_ROUND workers of this round's run, then let it finish."""
    kills = 0
    run_no = 0
    run_id = f"r{round_no}-run{run_no}"
    tasks = list(TASKS)
    for attempt_no in range(ATTEMPTS_PER_ROUND):
        point = choose(rng, tasks)
        attempt = start_attempt(
            host, direction, run_id, run_dir / run_id, tasks=tasks, params=CONFIRMED, gap=GAP
        )
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
    scenario = Scenario(direction, BATCH)
    expected = baseline(scenario, ROUNDS)
    scenario.prepare(world)
    target = KILLS // 2
    kills: list[dict[str, Any]] = []
    round_no = 0
    while len(kills) < target:
        assert round_no < ROUNDS, f"only {len(kills)} kills landed in {ROUNDS} rounds"
        scenario.change(world, round_no)
        run_round(world, worker_host, direction, tmp_path, rng, round_no, kills.append)
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
    scenario = Scenario(direction, BATCH)
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
