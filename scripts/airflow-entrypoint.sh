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
  # The file is read, never sourced or evaluated: each line must be exactly one of the two API
  # connections as `sandbox serve --env-file` writes it (a single-quoted value), and both must be
  # there; anything else stops the container rather than run with the deployment's own ones.
  line_pattern="^export (AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT|AIRFLOW_CONN_DYNAMICS365_DEFAULT)='([^']*)'$"
  taken=()
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ ! "$line" =~ $line_pattern ]]; then
      echo "$env_file holds a line that is not one of the two sandbox connections; not used" >&2
      exit 1
    fi
    export "${BASH_REMATCH[1]}=${BASH_REMATCH[2]}"
    taken+=("${BASH_REMATCH[1]}")
  done < "$env_file"
  if [[ " ${taken[*]-} " != *" AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT "* ||
        " ${taken[*]-} " != *" AIRFLOW_CONN_DYNAMICS365_DEFAULT "* ]]; then
    echo "$env_file lacks one of the two sandbox connections; not used" >&2
    exit 1
  fi
fi
exec /entrypoint "$@"
