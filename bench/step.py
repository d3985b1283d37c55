"""One step of a flow in this process, as its Airflow task runs it in its own: prints one JSON line
with the step's seconds, its counts and the process's peak RSS (`VmHWM`).

Run: `python -m bench.step <flow> <step> <run_id> <state_url>` (the connections and the staging
folder come from the environment, as `bench.harness` sets them).
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    """Run the step; print `{"seconds", "counts", "peak_rss_mib"}`."""
    flow_name, step, run_id, state_url = argv
    from bench.harness import quiet_logs
    from bench.scale import vm_hwm_mib

    quiet_logs()
    from crm_sync.context import StepContext
    from crm_sync.core import Flow
    from crm_sync.params import RunParams
    from crm_sync.settings import current_settings
    from crm_sync.steps import steps_of

    flow = Flow(flow_name)
    function = dict(steps_of(flow).in_order())[step]
    ctx = StepContext(
        flow=flow,
        dag_id=flow.value,
        run_id=run_id,
        settings=current_settings(),
        run_params=RunParams.parse(flow, {}),
        state_url=state_url,
    )
    started = time.perf_counter()
    summary = function(ctx)
    seconds = time.perf_counter() - started
    peak = vm_hwm_mib("self")  # not ru_maxrss: it carries the parent's peak across exec
    out = {"seconds": seconds, "counts": summary.get("counts", {}), "peak_rss_mib": peak}
    print(json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
