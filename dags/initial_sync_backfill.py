"""
# Initial sync (historical backfill)

Brings **every** Dynamics 365 lead and contact that matches the data configuration into
ActiveCampaign, once, with the same five steps and guarantees as the scheduled DAG. Trigger it from
the UI (▶ with the form): choose the entities, an optional *modified since* date, `dry_run`, and the
batch size.

It is safe to run twice (the second run writes nothing), and when it finishes the scheduled
`dynamics365_to_activecampaign` DAG continues from where it ended. A paused DAG's runs stay
queued: keep the trigger form's *Unpause on trigger* box ticked (the default), or unpause it first
when triggering through the API or CLI. It has no schedule: unpaused, it runs only when triggered.
"""

from airflow.sdk import DAG
from crm_sync.core import Flow
from crm_sync.dag_factory import build_sync_dag

dag: DAG = build_sync_dag(Flow.BACKFILL, doc_md=__doc__)
