#!/usr/bin/env bash
# Image entrypoint: with CRM_SYNC_SANDBOX=true, point the ActiveCampaign and Dynamics 365
# connections at the sandbox container, then hand over to the official entrypoint. This image has
# no emulators: the sandbox service writes the connections (`python -m sandbox serve --env-file`)
# into its data volume, mounted here read-only. Nothing of the file is echoed.
set -euo pipefail

if [[ "${CRM_SYNC_SANDBOX:-false}" == "true" ]]; then
  env_file="${CRM_SYNC_SANDBOX_ENV_FILE:-/opt/sandbox/connections.env}"
  for _ in $(seq 1 60); do
    [[ -f "$env_file" ]] && break
    sleep 1
  done
  if [[ ! -f "$env_file" ]]; then
    echo "CRM_SYNC_SANDBOX=true, but $env_file does not exist: is the sandbox service running" \
      "(docker compose --profile sandbox up -d)?" >&2
    exit 1
  fi
  # Only `export AIRFLOW_CONN_*=...` lines are sourced; anything else stops the container.
  if grep -qvE '^export AIRFLOW_CONN_[A-Z0-9_]+=' "$env_file"; then
    echo "$env_file holds more than AIRFLOW_CONN_* exports; not sourced" >&2
    exit 1
  fi
  # shellcheck source=/dev/null
  source "$env_file"
fi
exec /entrypoint "$@"
