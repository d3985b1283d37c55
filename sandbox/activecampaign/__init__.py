"""A local emulator of the ActiveCampaign API v3 (contacts, tags, fields, bulk import, webhooks)."""
