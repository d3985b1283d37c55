"""Sync logic for the ActiveCampaign <-> Dynamics 365 DAGs: settings, tags, steps, state."""
