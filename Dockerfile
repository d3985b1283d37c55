# The project's Airflow image, two targets:
#   production (the last stage, so the default): the official Airflow image plus the pinned
#     requirements and the sync's packages (crm_sync, crm_connectors) installed in editable mode, so
#     the dags/, include/ and plugins/ folders that docker-compose.yaml mounts over the copies are
#     live. No emulators (sandbox/) and no developer tools (devtools/).
#   sandbox: the same plus the emulators, for the compose `sandbox` service only.
# The Airflow version here must match the apache-airflow pin in requirements.txt.
FROM apache/airflow:3.3.2-python3.11 AS base

USER root
# Shared volumes start out with the ownership of these directories (AIRFLOW_UID runs with gid 0).
RUN mkdir -p /opt/airflow/staging /opt/airflow/auth /opt/sandbox \
    && chown -R airflow:0 /opt/airflow/staging /opt/airflow/auth /opt/sandbox \
    && chmod -R g+rwX /opt/airflow/staging /opt/airflow/auth /opt/sandbox
USER airflow

WORKDIR /opt/airflow
# The lock (constraints.txt) keeps every transitive version equal to what the tests ran with.
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/airflow/
RUN pip install --no-cache-dir -r requirements.txt -c constraints.txt

COPY --chown=airflow:0 pyproject.toml README.md /opt/airflow/
COPY --chown=airflow:0 include/ /opt/airflow/include/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 config/ /opt/airflow/config/
COPY --chown=airflow:0 scripts/ /opt/airflow/scripts/
# pyproject.toml finds its packages: without sandbox/ and devtools/ here, only these two.
RUN pip install --no-cache-dir --no-deps -e . -c constraints.txt \
    && python -c "import crm_sync, crm_connectors"

ENV CRM_SYNC_STAGING=/opt/airflow/staging \
    GX_ANALYTICS_ENABLED=false \
    PYTHONWARNINGS=ignore:GitWildMatchPattern:DeprecationWarning

# With CRM_SYNC_SANDBOX=true the wrapper points the connections at the sandbox container.
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/opt/airflow/scripts/airflow-entrypoint.sh"]
CMD ["--help"]

# The compose `sandbox` service: the emulators on top; installed again so that pyproject.toml
# finds them too.
FROM base AS sandbox
COPY --chown=airflow:0 sandbox/ /opt/airflow/sandbox/
RUN pip install --no-cache-dir --no-deps -e . -c constraints.txt \
    && python -c "import crm_sync, crm_connectors, sandbox"

# The image every Airflow service runs (the default target).
FROM base AS production
