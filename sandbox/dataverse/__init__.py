"""Local emulator of the Dataverse Web API (leads, contacts) and its Entra ID token endpoint."""
