"""Test-side access to both emulators over plain HTTP, and a runner for the real DAGs."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cached_property
from pathlib import Path
from typing import Any

import requests

from tests.conftest import Sandbox

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
API = "/api/data/v9.2"


class World:
    """The two systems as a user (or an automation) would change them, plus the state store."""

    def __init__(self, sandbox: Sandbox, state_url: str) -> None:
        self.sandbox = sandbox
        self.state_url = state_url
        self.ac = requests.Session()
        self.ac.headers["Api-Token"] = sandbox.credentials.ac_api_token
        self.dv = requests.Session()
        self.dv.trust_env = False
        self.dv.verify = sandbox.ca_path
        self.summaries: dict[str, dict[str, Any]] = {}

    # -- ActiveCampaign ---------------------------------------------------------------------------
    def _ac(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.ac.request(
            method, f"{self.sandbox.ac_url}/api/3/{path}", timeout=30, **kwargs
        )
        response.raise_for_status()
        return response.json()

    @cached_property
    def field_ids(self) -> dict[str, str]:
        """Custom field ids by personalization tag, creating COMPANY and JOB_TITLE if missing."""
        fields = {
            f["perstag"]: f["id"]
            for f in self._ac("GET", "fields", params={"limit": 100})["fields"]
        }
        for tag, title in (("COMPANY", "Company"), ("JOB_TITLE", "Job Title")):
            if tag not in fields:
                body = {"field": {"title": title, "type": "text", "perstag": tag}}
                fields[tag] = self._ac("POST", "fields", json=body)["field"]["id"]
        return fields

    def ac_contact(
        self, email: str, first: str | None = "Ann", last: str | None = "Lee", **custom: str
    ) -> str:
        """Create an AC contact; returns its id."""
        contact: dict[str, Any] = {"email": email, "firstName": first, "lastName": last}
        if custom:
            contact["fieldValues"] = [
                {"field": self.field_ids[k], "value": v} for k, v in custom.items()
            ]
        return self._ac("POST", "contacts", json={"contact": contact})["contact"]["id"]

    def ac_update(self, contact_id: str, **fields: Any) -> None:
        """Change standard fields of an AC contact, as a marketer would."""
        self._ac("PUT", f"contacts/{contact_id}", json={"contact": fields})

    def ac_tag(self, contact_id: str, *names: str) -> None:
        """Add tags by name (created if missing)."""
        for name in names:
            found = self._ac("GET", "tags", params={"filters[search][eq]": name})["tags"]
            tag_id = (
                found[0]["id"]
                if found
                else self._ac("POST", "tags", json={"tag": {"tag": name, "tagType": "contact"}})[
                    "tag"
                ]["id"]
            )
            self._ac(
                "POST", "contactTags", json={"contactTag": {"contact": contact_id, "tag": tag_id}}
            )

    def ac_untag(self, contact_id: str, name: str) -> None:
        for row in self._ac("GET", f"contacts/{contact_id}/contactTags")["contactTags"]:
            tag = self._ac("GET", f"tags/{row['tag']}")["tag"]
            if tag["tag"] == name:
                self._ac("DELETE", f"contactTags/{row['id']}")

    def automation(self, ids: list[str], kind: str) -> None:
        """The AC automation step "Create a lead/contact in Microsoft Dynamics"."""
        self.sandbox.admin("ac", "POST", "automation", json={"contact_ids": ids, "type": kind})

    def ac_contacts(self) -> list[dict[str, Any]]:
        """Every AC contact with its tags and custom fields."""
        return self.sandbox.admin("ac", "GET", "contacts/export")["contacts"]

    def ac_by_email(self, email: str) -> dict[str, Any]:
        (found,) = [c for c in self.ac_contacts() if c["email"].lower() == email.lower()]
        return found

    # -- Dataverse ------------------------------------------------------------------------------
    @cached_property
    def _token(self) -> str:
        creds = self.sandbox.credentials
        response = self.dv.post(
            f"{self.sandbox.d365_url}/{creds.tenant_id}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": creds.client_id,
                "client_secret": creds.client_secret,
                "scope": f"{self.sandbox.d365_url}/.default",
            },
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["access_token"]

    def _dv(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self._token}", **kwargs.pop("headers", {})}
        response = self.dv.request(
            method, f"{self.sandbox.d365_url}{API}/{path}", headers=headers, timeout=30, **kwargs
        )
        response.raise_for_status()
        return response

    def dv_create(self, entity_set: str, **row: Any) -> str:
        """Create a Dataverse row as a Dynamics user would; returns its id."""
        response = self._dv(
            "POST", entity_set, json=row, headers={"Prefer": "return=representation"}
        )
        body = response.json()
        return body.get("leadid") or body.get("contactid")

    def dv_update(self, entity_set: str, row_id: str, **row: Any) -> None:
        self._dv("PATCH", f"{entity_set}({row_id})", json=row, headers={"If-Match": "*"})

    def qualify(self, lead_id: str, *, account: bool = False, opportunity: bool = False) -> str:
        """QualifyLead creating a contact (and an account, an opportunity); the contact's id."""
        body = {
            "CreateAccount": account,
            "CreateContact": True,
            "CreateOpportunity": opportunity,
            "Status": 3,
        }
        value = self._dv(
            "POST", f"leads({lead_id})/Microsoft.Dynamics.CRM.QualifyLead", json=body
        ).json()["value"]
        return next(v["contactid"] for v in value if "contactid" in v)

    def dv_rows(self, entity_set: str) -> list[dict[str, Any]]:
        """Every row of a table (admin export)."""
        body = self.sandbox.admin("d365", "GET", f"export/{entity_set}")
        return body["value"] if isinstance(body, dict) else body

    def counters(self, service: str) -> dict[str, Any]:
        return self.sandbox.admin(service, "GET", "counters")

    # -- Airflow --------------------------------------------------------------------------------
    def run(self, dag_id: str, **conf: Any) -> Any:
        """Run a real DAG in this process with `dag.test()`; returns the finished DagRun."""
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(DAGS_FOLDER))
        assert bag.import_errors == {}, bag.import_errors
        dag = bag.dags[dag_id]
        for task in dag.tasks:
            task.retries = 0  # a failure shows at once instead of after the production backoff
        return dag.test(run_conf=conf or None)

    def run_steps(
        self,
        dag_id: str,
        *,
        event_run: bool = False,
        run_id: str | None = None,
        only: tuple[str, ...] | None = None,
    ) -> str:
        """Run a flow's steps in this process, as its tasks call them (`only`: these steps);
        `event_run`: as a run the webhook receiver's asset event started. Returns the run id;
        each step's summary is in `summaries`."""
        import uuid

        from crm_sync.context import StepContext
        from crm_sync.core import Flow
        from crm_sync.settings import current_settings
        from crm_sync.steps import steps_of

        flow = Flow(dag_id)
        run_id = run_id or f"asset_triggered__{uuid.uuid4().hex[:12]}"
        for step, function in steps_of(flow).in_order():
            if only is not None and step not in only:
                continue
            ctx = StepContext(
                flow=flow,
                dag_id=dag_id,
                run_id=run_id,
                settings=current_settings(),
                state_url=self.state_url,
                event_run=event_run,
            )
            self.summaries[step] = function(ctx)
            if "store" in ctx.__dict__:
                ctx.store.engine.dispose()
        return run_id


def migrate_airflow_db() -> None:
    """Create the metadata database of the tests' throw-away AIRFLOW_HOME."""
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run(
        [str(airflow), "db", "migrate"],
        env=os.environ.copy(),
        check=True,
        capture_output=True,
        timeout=300,
    )


def wired_world(sandbox: Sandbox, state_url: str, tmp_path: Path, monkeypatch: Any) -> World:
    """A World on `sandbox` with the state-store connection and a fresh staging folder set for
    the test (`monkeypatch` undoes them)."""
    import json

    monkeypatch.setenv(
        "AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps({"conn_type": "generic", "host": state_url})
    )
    monkeypatch.setenv("CRM_SYNC_STAGING", str(tmp_path / "staging"))
    world = World(sandbox, state_url)
    assert world.field_ids  # the mapped AC custom fields exist, as in a configured account
    return world
