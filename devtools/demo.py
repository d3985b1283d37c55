"""`make demo`: the whole product against the bundled sandbox, with a readable summary and checks.

Starts the sandbox (limits on), seeds it, runs the initial sync, applies the AC automation action to
some contacts, changes records on both sides (a few invalid on purpose), runs both direction DAGs
with the real `airflow dags test`, runs them again to show that nothing echoes, then checks the
final state of both systems. Exits non-zero when anything is not as expected.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from crm_sync.state import StateStore

from sandbox.credentials import connection_env, load_or_create
from sandbox.process import SandboxProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / ".sandbox" / "demo"
# Its own Airflow home: the demo's runs stay out of the `make up` UI (which uses .airflow).
AIRFLOW_HOME = ROOT / ".airflow-demo"
LOG_DIR = AIRFLOW_HOME / "demo-logs"
DAGS = ("initial_sync_backfill", "activecampaign_to_dynamics365", "dynamics365_to_activecampaign")


class Demo:
    """One demo run: the sandbox process, the Airflow environment, the checks."""

    def __init__(self) -> None:
        self.sandbox = SandboxProcess(
            DATA_DIR, ac_port=free_port(8081), d365_port=free_port(8443), admin_timeout=120
        )
        self.env = os.environ.copy()
        self.failures: list[str] = []
        self._store: StateStore | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def start_sandbox(self) -> None:
        shutil.rmtree(DATA_DIR, ignore_errors=True)
        print(
            f"• starting the sandbox (ActiveCampaign :{self.sandbox.ac_port}, Dataverse :{self.sandbox.d365_port}, rate limits on)"
        )
        self.sandbox.start()
        self.env.update(connection_env(DATA_DIR))
        self.env["CRM_SYNC_STAGING"] = str(DATA_DIR / "staging")
        self.env["AIRFLOW_HOME"] = str(AIRFLOW_HOME)

    def stop(self) -> None:
        self.sandbox.stop()

    def seed(self) -> None:
        print(
            "• seeding: 60 ActiveCampaign contacts; in Dynamics 120 leads, 80 contacts, "
            "12 accounts, 16 opportunities"
        )
        self.sandbox.seed(
            seed=7, ac_contacts=60, leads=120, contacts=80, accounts=12, opportunities=16
        )

    def migrate(self) -> None:
        print(f"• preparing Airflow's metadata database in {AIRFLOW_HOME}")
        subprocess.run(
            [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
            env=self.env, check=True, capture_output=True,
        )  # fmt: skip

    # -- the two systems --------------------------------------------------------------------------
    def admin(self, service: str, method: str, path: str, **kwargs: Any) -> Any:
        return self.sandbox.admin(service, method, path, **kwargs)

    def ac_contacts(self) -> list[dict[str, Any]]:
        return list(self.admin("ac", "GET", "contacts/export")["contacts"])

    def dv_rows(self, entity_set: str) -> list[dict[str, Any]]:
        body = self.admin("d365", "GET", f"export/{entity_set}")
        return list(body["value"] if isinstance(body, dict) else body)

    def ac_api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One AC API call as a user's script would make it: within the 5 requests a second
        (limits are on), waiting out a 429 as its Retry-After says."""
        for _ in range(10):
            response = requests.request(
                method, f"{self.sandbox.ac_url}/api/3/{path}",
                headers={"Api-Token": load_or_create(DATA_DIR).ac_api_token}, timeout=60,
                **kwargs,
            )  # fmt: skip
            if response.status_code != 429:
                break
            time.sleep(float(response.headers.get("Retry-After") or 1))
        response.raise_for_status()
        return response.json()

    # -- running DAGs -------------------------------------------------------------------------------
    def run_dag(
        self, dag_id: str, label: str, conf: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_path = LOG_DIR / f"{label}.log"
        command = [str(Path(sys.executable).with_name("airflow")), "dags", "test", dag_id]
        if conf:
            command += ["--conf", json.dumps(conf)]
        started = time.monotonic()
        with log_path.open("wb") as log:
            result = subprocess.run(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        seconds = time.monotonic() - started
        report = self.last_run(dag_id)
        status = report.get("status") if report else None
        ok = result.returncode == 0 and status == "success"
        print(
            f"\n■ {label}: {dag_id}  ({'ok' if ok else 'FAILED'}, {seconds:.0f} s, log: {log_path.relative_to(ROOT)})"
        )
        for key, value in sorted((report or {}).get("counts", {}).items(), key=lambda kv: -kv[1]):
            print(f"    {key:<58} {value:>6}")
        if not ok:
            self.failures.append(
                f"{label}: {dag_id} did not succeed (exit {result.returncode}, status {status})"
            )
        return report or {}

    @property
    def store(self) -> StateStore:
        """The sync state store the DAGs write to (the `crm_sync_state` connection)."""
        if self._store is None:
            url = json.loads(self.env["AIRFLOW_CONN_CRM_SYNC_STATE"])["host"]
            self._store = StateStore.from_url(url)
        return self._store

    def last_run(self, dag_id: str) -> dict[str, Any] | None:
        return self.store.last_run_report(dag_id)

    def quarantine(self, direction: str) -> dict[str, str]:
        """Open quarantine entries of one direction: record key -> reason."""
        return {e.record_key: e.reason_code for e in self.store.open_quarantine(direction)}

    def check(self, what: str, condition: bool) -> None:
        print(f"    {'✓' if condition else '✗'} {what}")
        if not condition:
            self.failures.append(what)

    # -- the story --------------------------------------------------------------------------------
    def story(self) -> None:
        self.run_dag("initial_sync_backfill", "1. initial sync (backfill)")
        dv_emails = {
            r["emailaddress1"].strip().lower()
            for s in ("leads", "contacts")
            for r in self.dv_rows(s)
            if r.get("emailaddress1")
        }
        ac = {c["email"].lower(): c for c in self.ac_contacts()}
        self.check(
            "every seeded Dynamics record with a valid email is in ActiveCampaign exactly once",
            all(e in ac for e in dv_emails if "@" in e and "." in e.split("@")[-1]),
        )
        self.check("no duplicate ActiveCampaign emails", len(ac) == len(self.ac_contacts()))
        self.check_accounts_and_deals()

        rng = random.Random(7)
        plain = [c for c in self.ac_contacts() if not any(t.startswith("D365:") for t in c["tags"])]
        leads, contacts = plain[:6], plain[6:10]
        print("\n• AC automation 'Create a lead/contact in Microsoft Dynamics' on 10 contacts")
        self.admin(
            "ac",
            "POST",
            "automation",
            json={"contact_ids": [c["id"] for c in leads], "type": "lead"},
        )
        self.admin(
            "ac",
            "POST",
            "automation",
            json={"contact_ids": [c["id"] for c in contacts], "type": "contact"},
        )
        both = plain[10]
        self.admin("ac", "POST", "automation", json={"contact_ids": [both["id"]], "type": "lead"})
        self.admin(
            "ac", "POST", "automation", json={"contact_ids": [both["id"]], "type": "contact"}
        )
        print("• one contact gets both type tags (must be quarantined)")
        too_long = plain[11]
        self.ac_api("PUT", f"contacts/{too_long['id']}", json={"contact": {"firstName": "X" * 60}})
        self.admin(
            "ac", "POST", "automation", json={"contact_ids": [too_long["id"]], "type": "lead"}
        )
        print(
            "• one queued contact has a 60-character first name (Dynamics allows 50: quarantined)"
        )
        synced = [c for c in self.ac_contacts() if "D365: Pushed from Dynamics" in c["tags"]]
        edited = rng.sample(synced, 2)
        for contact in edited:
            self.ac_api(
                "PUT", f"contacts/{contact['id']}", json={"contact": {"lastName": "Edited-in-AC"}}
            )
        print("• 2 synced contacts change their last name in ActiveCampaign")
        leads_now = [r for r in self.dv_rows("leads") if r["statecode"] == 0]
        changed_leads, broken = rng.sample(leads_now, 3), leads_now[-1]
        for row in changed_leads:
            self.admin(
                "d365", "PATCH", f"rows/leads/{row['leadid']}", json={"jobtitle": "Head of Demo"}
            )
        self.admin(
            "d365",
            "PATCH",
            f"rows/leads/{broken['leadid']}",
            json={"emailaddress1": "not-an-email"},
        )
        print("• 3 Dynamics leads change their job title; 1 gets an invalid email (quarantined)")

        renamed = self.store.object_links("account")[0]
        self.ac_api(
            "PUT", f"accounts/{renamed.ac_id}", json={"account": {"name": "Renamed in AC Ltd"}}
        )
        print("• 1 synced account is renamed in ActiveCampaign")

        before = {s: len(self.dv_rows(s)) for s in ("leads", "contacts")}
        self.run_dag("activecampaign_to_dynamics365", "2. ActiveCampaign → Dynamics 365")
        self.check(
            "the account renamed in ActiveCampaign is renamed in Dynamics",
            any(
                r["accountid"] == renamed.dataverse_id and r["name"] == "Renamed in AC Ltd"
                for r in self.dv_rows("accounts")
            ),
        )
        after = {s: len(self.dv_rows(s)) for s in ("leads", "contacts")}
        dv_by_email = {
            r["emailaddress1"].lower(): r
            for s in ("leads", "contacts")
            for r in self.dv_rows(s)
            if r.get("emailaddress1")
        }
        queued = [(c, "leads") for c in leads] + [(c, "contacts") for c in contacts]
        self.check(
            "each queued AC contact exists in Dynamics (a new record, or linked by email)",
            all(c["email"].lower() in dv_by_email for c, _ in queued),
        )
        self.check(
            "the 2 last names edited in ActiveCampaign reached Dynamics",
            all(dv_by_email[c["email"].lower()]["lastname"] == "Edited-in-AC" for c in edited),
        )
        quarantine = self.quarantine("activecampaign_to_dynamics365")
        self.check(
            "both-type-tags and too-long contacts are quarantined with their reasons",
            quarantine
            == {f"ac:{both['id']}": "both_type_tags", f"ac:{too_long['id']}": "too_long"},
        )
        self.check(
            "Dynamics grew by the queued records that did not exist there yet",
            sum(after.values()) - sum(before.values())
            == len([c for c, _ in queued if c["email"].lower() not in dv_emails]),
        )

        won = next(
            r for r in self.dv_rows("opportunities")
            if r["statecode"] == 0
            and r["opportunityid"] in {lk.dataverse_id for lk in self.store.object_links("opportunity")}
        )  # fmt: skip
        self.admin(
            "d365",
            "POST",
            "actions/WinOpportunity",
            json={"OpportunityClose": {"opportunityid@odata.bind": f"/opportunities({won['opportunityid']})"}, "Status": 3},
        )  # fmt: skip
        print("• 1 synced opportunity is won in Dynamics")

        touched = {r["leadid"] for r in [*changed_leads, broken]}
        deleted_lead = next(
            link
            for link in self.store.all_links()
            if link.entity == "lead" and link.dataverse_id not in touched
        )
        self.admin("d365", "DELETE", f"rows/leads/{deleted_lead.dataverse_id}")
        print("\n• a synced lead is deleted in Dynamics (on_delete: tag)")
        report = self.run_dag("dynamics365_to_activecampaign", "3. Dynamics 365 → ActiveCampaign")
        ac = {c["email"].lower(): c for c in self.ac_contacts()}
        self.check(
            "the 3 changed leads reached ActiveCampaign",
            all(
                ac[r["emailaddress1"].lower()]["fields"].get("JOB_TITLE") == "Head of Demo"
                for r in changed_leads
            ),
        )
        self.check(
            "the lead with an invalid email is quarantined, its AC contact untouched",
            self.quarantine("dynamics365_to_activecampaign")
            == {f"lead:{broken['leadid']}": "invalid_email"}
            and "not-an-email" not in ac,
        )
        deleted_tags = ac.get(deleted_lead.email, {}).get("tags", [])
        self.check(
            "the lead deleted in Dynamics: its AC contact is tagged 'D365: Deleted in Dynamics'",
            "D365: Deleted in Dynamics" in deleted_tags and "D365: Lead" not in deleted_tags,
        )
        (deal_link,) = self.store.object_links("opportunity", dataverse_ids=[won["opportunityid"]])
        self.check(
            "the opportunity won in Dynamics is a won deal in ActiveCampaign",
            str(self.ac_api("GET", f"deals/{deal_link.ac_id}")["deal"]["status"]) == "1",
        )
        self.check(
            "records created from AC are not echoed back as changes",
            report.get("counts", {}).get("created in ActiveCampaign (lead)", 0) == 0,
        )

        # The AC -> Dynamics run learned the AC ids of the backfill's links (its deletion scan).
        linked = {lk.ac_contact_id: lk for lk in self.store.all_links() if lk.entity == "contact"}
        opted_out = next(c for c in self.ac_contacts() if c["id"] in linked)
        self.ac_api("DELETE", f"contacts/{opted_out['id']}")
        print("\n• a synced contact is deleted in ActiveCampaign (on_delete: tag)")
        print("• both directions again: a loop-proof sync writes nothing")
        again_ac = self.run_dag(
            "activecampaign_to_dynamics365", "4. ActiveCampaign → Dynamics 365 (again)"
        )
        again_dv = self.run_dag(
            "dynamics365_to_activecampaign", "5. Dynamics 365 → ActiveCampaign (again)"
        )
        written = [
            k
            for r in (again_ac, again_dv)
            for k, v in r.get("counts", {}).items()
            if v and any(w in k for w in ("created", "updated", "put on", "taken off"))
        ]
        self.check("no writes on the second pass (no echo loop)", not written)
        self.check(
            "the contact deleted in ActiveCampaign is recorded, its Dynamics record kept",
            any(
                d.deleted_in == "activecampaign" and d.ac_contact_id == opted_out["id"]
                for d in self.store.all_deletions()
            )
            and any(
                r["contactid"] == linked[opted_out["id"]].dataverse_id
                for r in self.dv_rows("contacts")
            ),
        )

    def check_accounts_and_deals(self) -> None:
        """After the initial sync: accounts, contacts on them, and deals in ActiveCampaign."""
        accounts = self.ac_api("GET", "accounts", params={"limit": 100})["accounts"]
        links = {lk.dataverse_id: lk.ac_id for lk in self.store.object_links("account")}
        waiting = self.quarantine("dynamics365_to_activecampaign")
        active = [r for r in self.dv_rows("accounts") if r["statecode"] == 0]
        print(
            f"    {len(accounts)} AC accounts, {len(links)} linked; "
            f"{sum(k.startswith('account:') for k in waiting)} accounts quarantined"
        )
        self.check(
            "every active Dynamics account is an AC account, or quarantined with its reason",
            all(r["accountid"] in links or f"account:{r['accountid']}" in waiting for r in active),
        )
        ac_by_contact = {
            str(a["contact"]): str(a["account"])
            for a in self.ac_api("GET", "accountContacts", params={"limit": 100})["accountContacts"]
        }
        contact_links = {
            lk.dataverse_id: lk.email for lk in self.store.all_links() if lk.entity == "contact"
        }
        ac_ids = {c["email"].lower(): str(c["id"]) for c in self.ac_contacts()}
        on_account = [
            (ac_ids.get(contact_links[r["contactid"]], ""), links[r["_parentcustomerid_value"]])
            for r in self.dv_rows("contacts")
            if r.get("_parentcustomerid_value") in links and r["contactid"] in contact_links
        ]
        self.check(
            f"the {len(on_account)} synced contacts of synced accounts are on that AC account",
            bool(on_account) and all(ac_by_contact.get(c) == a for c, a in on_account),
        )
        deals = self.ac_api("GET", "deals", params={"limit": 100})["deals"]
        deal_links = self.store.object_links("opportunity")
        print(
            f"    {len(deals)} AC deals from {len(self.dv_rows('opportunities'))} opportunities; "
            f"{sum(k.startswith('opportunity:') for k in waiting)} waiting in the quarantine"
        )
        self.check(
            "every synced opportunity is one AC deal, with its value in cents",
            len(deals) == len(deal_links) > 0
            and {str(d["id"]) for d in deals} == {lk.ac_id for lk in deal_links},
        )


def main() -> int:
    """Run the demo; 0 when every check held."""
    demo = Demo()
    try:
        demo.start_sandbox()
        demo.seed()
        demo.migrate()
        demo.story()
    finally:
        demo.stop()
    print()
    if demo.failures:
        print("DEMO FAILED:")
        for failure in demo.failures:
            print(f"  - {failure}")
        return 1
    print("Demo passed: every check held. Task logs are in", LOG_DIR.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
