"""The flows: one module per direction with its five step functions (`crm_sync.steps` names
them), and the readers and loaders they use."""
