"""Local emulators of the ActiveCampaign API v3 and the Dataverse Web API (with Entra ID)."""
