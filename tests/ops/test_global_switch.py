"""The global sync switch (issue 6, acceptance 7): a paused DAG holds Dynamics changes back, unpausing
lets them through. On a real multi-process Airflow (CeleryExecutor), driven through its REST API."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from crm_sync.state import StateStore

from tests.conftest import PROJECT_ROOT, Sandbox
from tests.deployment.cluster import AirflowCluster
from tests.e2e.world import World

pytestmark = [pytest.mark.sandbox, pytest.mark.postgres, pytest.mark.e2e, pytest.mark.slow]

DAG = "dynamics365_to_activecampaign"
# Long enough for the scheduler (1 s heartbeat here) to have started a run many times over.
HOLD_SECONDS = 20


def test_paused_dag_moves_nothing_and_unpausing_delivers_the_change(
    sandbox: Sandbox, postgres_url: str, tmp_path: Path
) -> None:
    world = World(sandbox, postgres_url)
    assert world.field_ids  # the mapped AC custom fields exist, as in a configured account
    lead = world.dv_create(
        "leads",
        emailaddress1="switch.lead@example.com",
        firstname="Sam",
        lastname="Switch",
        jobtitle="Engineer",
        subject="Global switch",
    )
    with AirflowCluster(
        root=tmp_path,
        dags_folder=PROJECT_ROOT / "dags",
        plugins_folder=PROJECT_ROOT / "plugins",
        pools_file=PROJECT_ROOT / "config" / "pools.json",
        workers=1,
        extra_env=sandbox.connection_env(postgres_url),
    ) as cluster:
        cluster.wait_for_dags([DAG])

        # Switched on: the lead reaches ActiveCampaign and is linked.
        cluster.run_dag(DAG, timeout=300)
        assert world.ac_by_email("switch.lead@example.com")["fields"]["JOB_TITLE"] == "Engineer"

        # Switched off: a change and a new lead in Dynamics, and a run triggered through the API.
        cluster.api("PATCH", f"dags/{DAG}", json={"is_paused": True})
        assert cluster.api("GET", f"dags/{DAG}")["is_paused"] is True
        world.dv_update("leads", lead, jobtitle="Director")
        world.dv_create(
            "leads", emailaddress1="while.paused@example.com", lastname="Paused", subject="x"
        )
        run_id = cluster.trigger(DAG)
        time.sleep(HOLD_SECONDS)
        assert cluster.api("GET", f"dags/{DAG}/dagRuns/{run_id}")["state"] == "queued"
        assert {ti["state"] for ti in cluster.task_instances(DAG, run_id)} <= {None}
        assert StateStore.from_url(postgres_url).run_report(DAG, run_id) is None
        assert world.ac_by_email("switch.lead@example.com")["fields"]["JOB_TITLE"] == "Engineer"
        emails = {c["email"].lower() for c in world.ac_contacts()}
        assert "while.paused@example.com" not in emails

        # Switched on again: the queued run executes and both changes arrive.
        cluster.unpause(DAG)
        cluster.wait_for_run(DAG, run_id, timeout=300)
    assert world.ac_by_email("switch.lead@example.com")["fields"]["JOB_TITLE"] == "Director"
    assert sorted(world.ac_by_email("while.paused@example.com")["tags"]) == [
        "D365: Lead",
        "D365: Pushed from Dynamics",
    ]
