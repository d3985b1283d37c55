"""
# ActiveCampaign → Dynamics 365

Creates and updates Dynamics 365 **leads** and **contacts** from ActiveCampaign contacts, on the
job frequency set in `include/config/sync.yaml`, and as soon as the webhook receiver stored
ActiveCampaign events (asset `activecampaign_webhook_events`, once `python -m crm_sync webhooks
install` registered the webhook).

**What moves**
- *New*: an AC contact tagged `D365: Lead` (or `D365: Contact`) + `D365: Pulled from ActiveCampaign`
  (the automation action "Create a lead / contact in Microsoft Dynamics") becomes a new Dynamics lead
  (or contact). An existing Dynamics record with the same email is linked, never duplicated.
- *Updates*: mapped fields of linked contacts carrying a type tag plus either origin tag.
- Everything else is counted as *not eligible*; records that cannot be synced go to the quarantine
  with a reason and are retried when they change.

**Runs started by webhook events** (run type *asset triggered*) take the queued events' contacts
from their payloads and read only their custom fields; scheduled and manual runs poll, as without
webhooks, and take the queued events too. Events that arrive during a run wait for it to end.

**Operating it**
- Pause / unpause is the on/off switch. Trigger a run to sync now: runs never overlap.
- Triggering it from the UI while it is paused **unpauses it** unless you untick the form's
  *Unpause on trigger* box (ticked by default).
- Trigger with `dry_run` to see the plan without writing; `confirm_mass_change` lets a run through
  the mass-change circuit breaker.
- Each task logs a summary table (counts by class and reason; no raw emails or names).
"""

from airflow.sdk import DAG
from crm_sync.core import Flow
from crm_sync.dag_factory import build_sync_dag

dag: DAG = build_sync_dag(Flow.AC_TO_D365, doc_md=__doc__)
