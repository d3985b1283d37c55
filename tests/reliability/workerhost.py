"""A warm process that forks killable workers, each running the sync DAG's own task callables.

Started once per test session (`python -m tests.reliability.workerhost`). It imports Airflow,
pandas, Great Expectations and the project, parses the three DAGs, and then never runs anything
itself: on each `run` command it forks a worker that runs the tasks of one DAG run in order, as
an Airflow worker would, so a worker costs milliseconds to start and can be SIGKILLed anywhere.

Protocol: one JSON object per line on stdin, one JSON answer per line on stdout.
- `{"op": "run", "dag_id", "run_id", "tasks": [...], "params": {...}, "env": {...},
   "run_dir": path, "gap": seconds}` -> `{"pid": n}`. The worker runs `tasks` (a suffix of
   extract..load) with the run's XComs kept in `run_dir`, writes `start <task>` / `done <task>`
   lines to `run_dir/progress`, waits `gap` seconds between tasks (the scheduler's hand-off), logs
   to `run_dir/worker-<pid>.log` and exits 0 when every task succeeded.
  Optional `"answers": [{"method", "path_prefix", "count", "then": "lose" | "hold",
  "seconds"}]`: the next `count` requests of the worker matching `method` and the URL path
  prefix that the server answers with success are sent and written as usual, and then their
  answer is lost (`lose`: the client sees a read timeout) or held (`hold`: the worker appends
  `<method> <path>` to `run_dir/held-<pid>` and waits `seconds` before it reads the answer, a
  window in which to kill it). Each answer lost or held is also appended to
  `run_dir/answers-<pid>`. This is how the tests make the server finish a write whose answer
  never reaches the sync (the sandbox's own faults act before the server reads the request).
- `{"op": "wait", "pid": n, "timeout": s}` -> `{"exit": code or null, "signal": n or null}`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
# Variables a command may set for its run; any other of these prefixes is removed first.
RUN_ENV_PREFIXES = ("AIRFLOW_CONN_", "CRM_SYNC_")


def _warm_up() -> dict[str, Any]:
    import crm_connectors.activecampaign
    import crm_connectors.dynamics365  # noqa: F401
    import crm_sync.flows.ac_to_d365
    import crm_sync.flows.activecampaign
    import crm_sync.flows.d365_to_ac
    import crm_sync.flows.dataverse  # noqa: F401
    import great_expectations  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import ObjectStoragePath  # noqa: F401

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return dict(bag.dags)


def _params(dag: Any, conf: dict[str, Any]) -> dict[str, Any]:
    """The run's params as Airflow resolves them: the DAG's defaults, then the run conf."""
    return {**{name: param.value for name, param in dag.params.items()}, **conf}


def _lose_answers(specs: list[dict[str, Any]], run_dir: Path) -> None:
    """Lose or hold the answers of some successful writes (see the module's protocol)."""
    from urllib.parse import urlsplit

    import requests

    pending = [dict(spec) for spec in specs]
    original = requests.Session.send

    def send(session: requests.Session, request: Any, **kwargs: Any) -> Any:
        response = original(session, request, **kwargs)
        path = urlsplit(request.url).path
        for spec in pending:
            if (
                spec["count"] > 0
                and request.method == spec["method"]
                and path.startswith(spec["path_prefix"])
                and response.status_code < 400
            ):
                spec["count"] -= 1
                with (run_dir / f"answers-{os.getpid()}").open("a") as note:
                    note.write(f"{spec['then']} {request.method} {path}\n")
                if spec["then"] == "hold":
                    with (run_dir / f"held-{os.getpid()}").open("a") as note:
                        note.write(f"{request.method} {path}\n")
                    time.sleep(float(spec.get("seconds") or 1.0))
                    break
                raise requests.exceptions.ReadTimeout(
                    "reliability test: the server wrote, the answer was lost", request=request
                )
        return response

    requests.Session.send = send  # type: ignore[method-assign]


def _run(dags: dict[str, Any], command: dict[str, Any]) -> None:
    """Body of a forked worker; never returns."""
    code = 1
    run_dir = Path(command["run_dir"])
    log_path = run_dir / f"worker-{os.getpid()}.log"
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        for name in [n for n in os.environ if n.startswith(RUN_ENV_PREFIXES)]:
            del os.environ[name]
        os.environ.update(command["env"])
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
        )
        if command.get("answers"):
            _lose_answers(command["answers"], run_dir)
        dag = dags[command["dag_id"]]
        context = {
            "dag_run": SimpleNamespace(dag_id=dag.dag_id, run_id=command["run_id"]),
            "params": _params(dag, command.get("params") or {}),
        }
        xcoms = run_dir / "xcom.json"
        progress = (run_dir / "progress").open("a", buffering=1)
        for task_id in command["tasks"]:
            task = dag.get_task(task_id)
            pushed = json.loads(xcoms.read_text()) if xcoms.exists() else {}
            upstream = [pushed[t] for t in task.upstream_task_ids]
            progress.write(f"start {task_id}\n")
            result = task.python_callable(*upstream, **context)
            pushed[task_id] = result
            xcoms.write_text(json.dumps(pushed, default=str))
            progress.write(f"done {task_id}\n")
            time.sleep(float(command.get("gap") or 0))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


_FINISHED: dict[int, dict[str, Any]] = {}


def _wait(pid: int, timeout: float) -> dict[str, Any]:
    """How worker `pid` ended (asking again answers the same), or `timeout` if it runs on."""
    deadline = time.monotonic() + timeout
    while pid not in _FINISHED:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            signaled = os.WIFSIGNALED(status)
            _FINISHED[pid] = {
                "exit": None if signaled else os.WEXITSTATUS(status),
                "signal": os.WTERMSIG(status) if signaled else None,
            }
        elif time.monotonic() > deadline:
            return {"exit": None, "signal": None, "timeout": True}
        else:
            time.sleep(0.01)
    return _FINISHED[pid]


def main() -> None:
    """Serve commands until stdin closes."""
    # Libraries print to stdout: answers get their own copy of it, and fd 1 goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    dags = _warm_up()
    print(json.dumps({"ready": True, "pid": os.getpid()}), file=answers, flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "run":
            Path(command["run_dir"]).mkdir(parents=True, exist_ok=True)
            pid = os.fork()
            if pid == 0:
                _run(dags, command)
            answer: dict[str, Any] = {"pid": pid}
        elif command["op"] == "wait":
            answer = _wait(int(command["pid"]), float(command.get("timeout") or 0))
        else:
            answer = {"error": f"unknown op {command['op']!r}"}
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    main()
