#!/usr/bin/env bash
# One-shot set-up for docker compose (service airflow-init, run as root): folders and their
# ownership, the admin password file, the metadata database, the sync state database, the pools.
set -euo pipefail

uid="${AIRFLOW_UID:-50000}"
if [[ "$uid" == "50000" ]]; then
  echo "AIRFLOW_UID is not set: files are owned by uid 50000 (set AIRFLOW_UID=\$(id -u) in .env)."
fi

mkdir -p /opt/airflow/logs /opt/airflow/staging /opt/airflow/auth

# SimpleAuthManager reads {"user": "password"} from this file; json.dumps quotes any password.
python - <<'PY'
import json
import os
from pathlib import Path

path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
user, password = os.environ["AIRFLOW_ADMIN_USER"], os.environ["AIRFLOW_ADMIN_PASSWORD"]
path.write_text(json.dumps({user: password}) + "\n")
path.chmod(0o600)
PY

airflow db migrate
python /opt/airflow/scripts/ensure_state_db.py
# One pool per external API: every task that calls that API runs in its pool (shared budget).
airflow pools import /opt/airflow/config/pools.json

chown -R "$uid:0" /opt/airflow/logs /opt/airflow/staging /opt/airflow/auth
echo "airflow-init: done"
