"""Airflow hooks for the ActiveCampaign API v3 and the Dataverse Web API."""
