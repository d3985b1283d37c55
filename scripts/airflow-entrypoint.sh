#!/usr/bin/env bash
# Image entrypoint: with CRM_SYNC_SANDBOX=true, point the three connections at the sandbox
# container (its data dir is mounted read-only), then hand over to the official entrypoint.
set -euo pipefail

if [[ "${CRM_SYNC_SANDBOX:-false}" == "true" ]]; then
  data_dir="${CRM_SYNC_SANDBOX_DATA_DIR:-/opt/sandbox}"
  for _ in $(seq 1 60); do
    [[ -f "$data_dir/sandbox.json" ]] && break
    sleep 1
  done
  # Assigned first so that a failure stops the container instead of keeping the .env values.
  exports="$(python -m sandbox env --data-dir "$data_dir" --state-url "${CRM_SYNC_STATE_URL:?}")"
  eval "$exports"
fi
exec /entrypoint "$@"
