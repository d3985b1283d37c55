"""
# Dynamics 365 → ActiveCampaign

Creates and updates ActiveCampaign contacts from Dynamics 365 **leads** and **contacts** that match
each entity's data configuration (`record_criteria` in `include/config/sync.yaml`), on the job
frequency set there.

**What moves**
- *New*: a Dynamics lead (or contact) with no AC contact becomes one, tagged `D365: Lead`
  (or `D365: Contact`) + `D365: Pushed from Dynamics`. An AC contact with the same email is linked and
  tagged, never duplicated.
- *Updates*: mapped fields go to AC contacts that carry their type tag plus either origin tag.
- A lead qualified into a contact moves the AC contact's tag from `D365: Lead` to `D365: Contact`.

**Operating it**
- This DAG is the **global sync switch**: paused, nothing moves from Dynamics to ActiveCampaign;
  unpaused, it resumes from its watermark without losing changes made meanwhile.
- Triggering it from the UI while it is paused **unpauses it** unless you untick the form's
  *Unpause on trigger* box (ticked by default): that turns the switch on.
- Trigger a run to sync now; `dry_run` shows the plan without writing.
"""

from airflow.sdk import DAG
from crm_sync.core import Flow
from crm_sync.dag_factory import build_sync_dag

dag: DAG = build_sync_dag(Flow.D365_TO_AC, doc_md=__doc__)
