"""Preflight (`python -m crm_sync check`): everything a first run needs, checked before it runs.

Connects with the same Airflow connections and hooks as the DAGs and reports one row per check
(check, status, detail naming the fix): both logins, the state store, the Dataverse application
user's privileges and the mapped columns of each synced table, each entity's `record_criteria`,
the mapped ActiveCampaign custom fields (`fix=True` creates the missing ones), the four D365 tags,
and the rate-limit headroom the APIs report. Each check is isolated: one that fails never stops
the others, and a check that needs a login that failed is reported as skipped, with why.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crm_sync.core import Direction
from crm_sync.settings import Entity, SyncSettings, load_settings, settings_path
from crm_sync.tags import ALL_TAGS

if TYPE_CHECKING:
    from crm_connectors.activecampaign import ActiveCampaignHook
    from crm_connectors.dynamics365 import Dynamics365Hook

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

# What each prerequisite is called when a check that needs it is skipped.
_PREREQUISITES = {
    "settings": "the settings could not be read",
    "activecampaign": "the ActiveCampaign login failed",
    "dynamics365": "the Dynamics 365 login failed",
}
# Privilege depths as the security role editor names them.
_DEPTH_LABELS = {
    "Basic": "User",
    "Local": "Business Unit",
    "Deep": "Parent: Child Business Units",
    "Global": "Organization",
}
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s@]+@")


@dataclass(frozen=True)
class Row:
    """One line of the report."""

    check: str
    status: str
    detail: str


@dataclass
class Preflight:
    """What the checks share: the settings, the logged-in hooks, and which prerequisites hold."""

    settings_file: Path | None = None
    fix: bool = False
    settings: SyncSettings | None = None
    ac: ActiveCampaignHook | None = None
    dv: Dynamics365Hook | None = None
    user_id: str | None = None
    ready: set[str] = field(default_factory=set)

    def close(self) -> None:
        for hook in (self.ac, self.dv):
            if hook is not None:
                hook.close()

    @property
    def conf(self) -> SyncSettings:
        assert self.settings is not None
        return self.settings

    @property
    def ac_hook(self) -> ActiveCampaignHook:
        assert self.ac is not None
        return self.ac

    @property
    def dv_hook(self) -> Dynamics365Hook:
        assert self.dv is not None
        return self.dv


def _retry_policy() -> Any:
    """Fewer, shorter retries than a run's: a preflight should answer within seconds."""
    from crm_connectors.retry import RetryPolicy

    return RetryPolicy(max_attempts=3, backoff_max=5.0, max_retry_after=30.0)


def describe(error: BaseException) -> str:
    """What went wrong and what to fix (the runner's configuration-error text when there is
    one), never with a credential or an email address."""
    from crm_connectors.redact import mask_emails

    from crm_sync.runner import configuration_error

    message = configuration_error(error) or f"{type(error).__name__}: {error}"
    return mask_emails(_URL_CREDENTIALS.sub("***@", message))


def _host(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


# -- settings and logins ---------------------------------------------------------------------


def check_settings(pf: Preflight) -> Iterator[Row]:
    path = pf.settings_file or settings_path()
    pf.settings = load_settings(path)
    pf.ready.add("settings")
    confs = [(entity, pf.conf.entities[entity]) for entity in Entity]
    entities = ", ".join(
        f"{entity.value} {conf.direction.value}" if conf.enabled else f"{entity.value} off"
        for entity, conf in confs
    )
    yield Row("settings", OK, f"{path.name} is valid: every {pf.conf.job_frequency}; {entities}")


def check_activecampaign_login(pf: Preflight) -> Iterator[Row]:
    from crm_connectors.activecampaign import ActiveCampaignHook

    pf.ac = ActiveCampaignHook(retry_policy=_retry_policy())
    pf.ac.current_user()
    pf.ready.add("activecampaign")
    yield Row(
        "activecampaign login",
        OK,
        f"{_host(pf.ac.base_url)} accepts the API token (connection "
        f"'{pf.ac.activecampaign_conn_id}')",
    )


def check_dynamics365_login(pf: Preflight) -> Iterator[Row]:
    from crm_connectors.dynamics365 import Dynamics365Hook

    pf.dv = Dynamics365Hook(retry_policy=_retry_policy())
    pf.user_id = str(pf.dv.whoami()["UserId"])
    pf.ready.add("dynamics365")
    yield Row(
        "dynamics365 login",
        OK,
        f"{_host(pf.dv.base_url)}: Entra ID issued a token and Dataverse accepts it "
        f"(connection '{pf.dv.dynamics365_conn_id}', application user {pf.user_id})",
    )


def check_state_store(pf: Preflight) -> Iterator[Row]:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from crm_sync.state import SCHEMA_VERSION, STATE_CONN_ID, StateStore, state_url_from_connection

    url = state_url_from_connection()
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        shown = "its URL"
    try:
        store = StateStore.from_url(url)  # creates missing tables, applies upgrades
        try:
            version = store.schema_version()
        finally:
            store.engine.dispose()
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        yield Row(
            "state store",
            FAIL,
            f"cannot open {shown} (connection '{STATE_CONN_ID}'): {reason}. Check the "
            "connection's host (a SQLAlchemy URL), that the database server runs and accepts "
            "this login, and for SQLite that the folder exists and is writable",
        )
        return
    if version != SCHEMA_VERSION:
        yield Row(
            "state store",
            FAIL,
            f"{shown}: schema version {version}, but this code uses {SCHEMA_VERSION}: deploy "
            "the version of crm-sync that wrote it, or a newer one",
        )
        return
    yield Row("state store", OK, f"{shown}: reachable, schema version {version} (current)")


# -- Dataverse -------------------------------------------------------------------------------


def _enabled(pf: Preflight) -> list[Entity]:
    return [entity for entity in Entity if pf.conf.entities[entity].enabled]


def check_privileges(pf: Preflight) -> Iterator[Row]:
    from crm_connectors.errors import CrmApiError

    entities = _enabled(pf)
    if not entities:
        yield Row("dataverse privileges", OK, "no entity is enabled")
        return
    try:
        held = pf.dv_hook.user_privileges(pf.user_id)
    except CrmApiError as error:
        yield Row(
            "dataverse privileges",
            WARN,
            f"could not read the application user's privileges ({describe(error)}); check its "
            "security role by hand: Read (and, for ActiveCampaign → Dynamics 365, Create and "
            "Write) on each synced table, Read and Write at Organization level",
        )
        return
    if not held:
        yield Row(
            "dataverse privileges",
            FAIL,
            "the application user holds no privilege: give it a security role (Power Platform "
            "admin center > Environments > Settings > Users + permissions > Application users)",
        )
        return
    for entity in entities:
        yield _privilege_row(pf.conf, entity, held)


def _privilege_row(settings: SyncSettings, entity: Entity, held: dict[str, str]) -> Row:
    return _table_privileges(
        entity.value.capitalize(),
        entity.value,
        held,
        writes=settings.entities[entity].moves(Direction.TO_DYNAMICS365),
    )


def _table_privileges(table: str, logical: str, held: dict[str, str], *, writes: bool) -> Row:
    """The row of one table's privileges (`table`: its schema name, `logical`: its logical name):
    Read, and with `writes` Create and Write."""
    # Read and Write reach every record whatever its owner: at a lower depth the sync would miss
    # the records other users own (and create duplicates of them) or fail to update them.
    needed: list[tuple[str, str | None, str]] = [("Read", "Global", "read")]
    if writes:
        needed += [("Create", None, "create"), ("Write", "Global", "update")]
    granted, problems, fixes = [], [], []
    for operation, depth, verb in needed:
        name = f"prv{operation}{table}"
        have = held.get(name)
        if have is None:
            problems.append(f"{name} is missing (the sync cannot {verb} {logical}s)")
        elif depth and have != depth:
            problems.append(
                f"{name} is at {_DEPTH_LABELS.get(have, have)} level (the sync would not "
                f"{verb} the {logical}s other users own)"
            )
        else:
            granted.append(f"{name} ({_DEPTH_LABELS.get(have, have)})")
            continue
        fixes.append(f"{operation} at {_DEPTH_LABELS[depth]} level" if depth else operation)
    label = f"dataverse privileges: {logical}"
    if problems:
        return Row(
            label,
            FAIL,
            f"{'; '.join(problems)}. Give the application user's security role "
            f"{', '.join(fixes)} on the {table} table (Power Platform admin center > "
            "Environments > Settings > Users + permissions > Security roles)",
        )
    return Row(label, OK, ", ".join(granted))


def check_columns(pf: Preflight) -> Iterator[Row]:
    from crm_sync.flows.dataverse import target_rules
    from crm_sync.mapping import fields_towards

    for entity in Entity:
        fields = pf.conf.mapping(entity)
        if not fields:
            continue
        label = f"dataverse columns: {entity.value}"
        columns = [f.dynamics365 for f in fields]
        # The same columns and writes the ActiveCampaign → Dynamics 365 run checks.
        written = [m.field for m in fields_towards(pf.conf, entity, Direction.TO_DYNAMICS365)]
        try:
            target_rules(pf.dv_hook, entity, columns, written=written)
        except Exception as error:
            yield Row(label, FAIL, describe(error))
            continue
        yield Row(
            label,
            OK,
            f"the {len(columns)} mapped columns exist; the {len(written)} that ActiveCampaign → "
            "Dynamics 365 writes accept create and update",
        )


def check_record_criteria(pf: Preflight) -> Iterator[Row]:
    for entity in _enabled(pf):
        conf = pf.conf.entities[entity]
        if not conf.moves(Direction.TO_ACTIVECAMPAIGN):
            label = f"record_criteria: {entity.value}"
            yield Row(label, OK, f"not used: {entity.value}s move only to Dynamics 365")
            continue
        yield _criteria_row(
            pf, entity.value, entity.entity_set, conf.record_criteria, f"entities.{entity.value}"
        )


def _criteria_row(pf: Preflight, name: str, entity_set: str, criteria: str | None, key: str) -> Row:
    """Whether Dataverse accepts a table's `record_criteria` (`key`: where sync.yaml sets it)."""
    from crm_connectors.errors import ClientError

    label = f"record_criteria: {name}"
    if not criteria:
        return Row(label, OK, f"not set: every {name} syncs")
    try:
        pf.dv_hook.first_row(entity_set, select=[f"{name}id"], filter=criteria)
    except ClientError as error:
        if error.status != 400:
            raise
        return Row(
            label,
            FAIL,
            f"Dataverse refused {key}.record_criteria in sync.yaml ({error.message}): fix the "
            "filter (a column the table has, a literal of the column's type; "
            "docs/configuration.md), or set it to null",
        )
    return Row(label, OK, "Dataverse accepts the filter")


def check_accounts_and_deals(pf: Preflight) -> Iterator[Row]:
    """Accounts and opportunities, when on: the tables' privileges and columns, their
    record_criteria, and the AC pipeline deals go to."""
    from crm_connectors.errors import CrmApiError

    accounts, deals = pf.conf.accounts, pf.conf.opportunities
    if not (accounts.enabled or deals.enabled):
        yield Row("accounts and deals", OK, "off in sync.yaml")
        return
    try:
        held: dict[str, str] | None = pf.dv_hook.user_privileges(pf.user_id)
    except CrmApiError as error:
        held = None
        yield Row(
            "dataverse privileges: account, opportunity",
            WARN,
            f"could not read the application user's privileges ({describe(error)})",
        )
    tables = []
    if accounts.enabled:
        tables.append(("Account", "account", "accounts", accounts.moves(Direction.TO_DYNAMICS365)))
    if deals.enabled:
        tables.append(("Opportunity", "opportunity", "opportunities", False))
    for schema, name, entity_set, writes in tables:
        if held is not None:
            yield _table_privileges(schema, name, held, writes=writes)
        criteria = accounts.record_criteria if name == "account" else deals.record_criteria
        yield _criteria_row(pf, name, entity_set, criteria, entity_set)
    if accounts.enabled:
        columns = list(
            dict.fromkeys([f.dynamics365 for f in accounts.field_mapping] + ["websiteurl"])
        )
        try:
            pf.dv_hook.check_columns("accounts", columns)
        except Exception as error:
            yield Row("dataverse columns: account", FAIL, describe(error))
        else:
            yield Row("dataverse columns: account", OK, f"the {len(columns)} columns exist")
    if deals.enabled:
        yield _pipeline_row(pf)


def _pipeline_row(pf: Preflight) -> Row:
    deals = pf.conf.opportunities
    label = "activecampaign pipeline"
    wanted = list(dict.fromkeys(deals.stages.values()))
    found = [
        p
        for p in pf.ac_hook.list_pipelines(title=deals.pipeline)
        if p.get("title") == deals.pipeline
    ]
    if not found:
        return Row(
            label,
            WARN,
            f"no pipeline '{deals.pipeline}' yet: the first load creates it, with the stages "
            f"{', '.join(wanted)}",
        )
    currency = str(found[0].get("currency") or "").lower()
    if currency and currency != deals.currency:
        return Row(
            label,
            FAIL,
            f"'{deals.pipeline}' is in {currency}, opportunities.currency says {deals.currency}: "
            "set opportunities.currency to the pipeline's, or use another pipeline",
        )
    stages = {str(s.get("title")) for s in found[0].get("dealStages") or []}
    missing = [t for t in wanted if t not in stages]
    if missing:
        return Row(
            label,
            WARN,
            f"'{deals.pipeline}' lacks the stages {', '.join(missing)}: the first load adds them",
        )
    return Row(label, OK, f"'{deals.pipeline}' has the {len(wanted)} stages")


# -- ActiveCampaign --------------------------------------------------------------------------


def _field_title(tag: str) -> str:
    """`JOB_TITLE` -> `Job Title`."""
    return " ".join(word.capitalize() for word in tag.split("_") if word) or tag


def check_custom_fields(pf: Preflight) -> Iterator[Row]:
    label = "activecampaign custom fields"
    wanted = sorted(
        {
            f.custom_field_tag
            for entity in Entity
            for f in pf.conf.mapping(entity)
            if f.custom_field_tag is not None
        }
    )
    if not wanted:
        yield Row(label, OK, "no custom field is mapped")
        return
    # Matched by personalization tag, as the sync matches them.
    existing = {str(f.get("perstag", "")).upper() for f in pf.ac_hook.list_fields()}
    missing = [tag for tag in wanted if tag not in existing]
    present = ", ".join(f"field:{tag}" for tag in wanted if tag in existing)
    if not missing:
        yield Row(label, OK, f"all mapped fields exist: {present}")
        return
    if not pf.fix:
        names = ", ".join(f"field:{tag}" for tag in missing)
        yield Row(
            label,
            FAIL,
            f"missing in ActiveCampaign: {names}. Run `python -m crm_sync check --fix` to create "
            "them (text fields on every list), or create each in ActiveCampaign (a contact "
            "field with that personalization tag), or remove it from field_mapping in sync.yaml",
        )
        return
    created, errors = [], []
    for tag in missing:
        try:
            pf.ac_hook.create_field(_field_title(tag), tag)
        except Exception as error:
            errors.append(f"field:{tag} could not be created ({describe(error)})")
        else:
            created.append(f"field:{tag} ('{_field_title(tag)}', text)")
    done = f"created {', '.join(created)}" if created else ""
    if errors:
        yield Row(label, FAIL, "; ".join(filter(None, [done, *errors])))
        return
    also = f"; already there: {present}" if present else ""
    yield Row(label, OK, f"{done}{also}")


def check_tags(pf: Preflight) -> Iterator[Row]:
    label = "activecampaign tags"
    names = [str(t.get("tag", "")) for t in pf.ac_hook.list_tags(starts_with="D365")]
    missing, variants = [], []
    for tag in (t.value for t in ALL_TAGS):
        others = [n for n in names if n.lower() == tag.lower() and n != tag]
        if tag not in names and others:
            variants += [f"'{n}' for '{tag}'" for n in others]
        elif tag not in names:
            missing.append(f"'{tag}'")
    problems = []
    if missing:
        problems.append(f"missing (the first run creates them): {', '.join(missing)}")
    if variants:
        # AC tag names are unique regardless of case: the sync uses the account's spelling.
        problems.append(
            f"the account spells {', '.join(variants)}: tag names are unique regardless of "
            "case, so the sync uses them as they are; rename them to the exact names in "
            "ActiveCampaign (Contacts > Tags) so that automations and people read the same"
        )
    if problems:
        yield Row(label, WARN, "; ".join(problems))
    else:
        yield Row(label, OK, "all four exist: " + ", ".join(f"'{t.value}'" for t in ALL_TAGS))


# -- rate limits -----------------------------------------------------------------------------


def check_activecampaign_rate(pf: Preflight) -> Iterator[Row]:
    headers = pf.ac_hook.rate_limit_headers()
    limit = headers.get("ratelimit-limit")
    remaining = headers.get("ratelimit-remaining")
    rate = pf.ac_hook.budget.rate
    paced = (
        f"the sync sends at most {rate:g} requests/s (the connection's rate_limit extra, "
        "default 5; ActiveCampaign allows 5 per account, shared by every integration)"
        if rate
        else "the hooks are not paced"
    )
    seen = (
        f"the last answer says RateLimit-Remaining {remaining} of {limit}"
        if limit or remaining
        else "the answers carry no RateLimit headers"
    )
    yield Row("activecampaign rate limit", OK, f"{seen}; {paced}")


def check_dynamics365_rate(pf: Preflight) -> Iterator[Row]:
    headers = pf.dv_hook.rate_limit_headers()
    parts = []
    if requests_left := headers.get("x-ms-ratelimit-burst-remaining-xrm-requests"):
        parts.append(f"{requests_left} requests left in the 5-minute window")
    if time_left := headers.get("x-ms-ratelimit-time-remaining-xrm-requests"):
        parts.append(f"{time_left} s of execution time left")
    if hint := headers.get("x-ms-dop-hint"):
        parts.append(f"x-ms-dop-hint {hint}: bulk writes run at most that many requests at once")
    detail = ", ".join(parts) if parts else "the answers carry no x-ms-ratelimit headers"
    yield Row("dynamics365 rate limit", OK, f"service protection (per user): {detail}")


@dataclass(frozen=True)
class Check:
    """A named check and the prerequisites it needs (settings, a login)."""

    name: str
    run: Callable[[Preflight], Iterator[Row]]
    needs: tuple[str, ...] = ()


CHECKS = (
    Check("settings", check_settings),
    Check("activecampaign login", check_activecampaign_login),
    Check("dynamics365 login", check_dynamics365_login),
    Check("state store", check_state_store),
    Check("dataverse privileges", check_privileges, ("settings", "dynamics365")),
    Check("dataverse columns", check_columns, ("settings", "dynamics365")),
    Check("record_criteria", check_record_criteria, ("settings", "dynamics365")),
    Check(
        "accounts and deals",
        check_accounts_and_deals,
        ("settings", "dynamics365", "activecampaign"),
    ),
    Check("activecampaign custom fields", check_custom_fields, ("settings", "activecampaign")),
    Check("activecampaign tags", check_tags, ("activecampaign",)),
    Check("activecampaign rate limit", check_activecampaign_rate, ("activecampaign",)),
    Check("dynamics365 rate limit", check_dynamics365_rate, ("dynamics365",)),
)


def run_checks(settings_file: Path | None = None, *, fix: bool = False) -> list[Row]:
    """Every check's rows, in order. Never raises for what a check finds."""
    pf = Preflight(settings_file=settings_file, fix=fix)
    rows: list[Row] = []
    try:
        for check in CHECKS:
            missing = [need for need in check.needs if need not in pf.ready]
            if missing:
                why = "; ".join(_PREREQUISITES[need] for need in missing)
                rows.append(Row(check.name, SKIP, f"skipped: {why}"))
                continue
            try:
                for row in check.run(pf):
                    rows.append(row)
            except Exception as error:
                rows.append(Row(check.name, FAIL, describe(error)))
    finally:
        pf.close()
    return rows


def summary(rows: list[Row]) -> str:
    """`N ok, N warnings, N failed` (and skipped ones, if any)."""
    count = {status: sum(r.status == status for r in rows) for status in (OK, WARN, FAIL, SKIP)}
    text = f"{count[OK]} ok, {count[WARN]} warnings, {count[FAIL]} failed"
    return text + (f", {count[SKIP]} skipped" if count[SKIP] else "")


def render(rows: list[Row], width: int = 120) -> str:
    """The report as a table (long details wrapped in their column) and the summary line."""
    name_width = max(len("CHECK"), *(len(r.check) for r in rows))
    indent = name_width + 2 + 6 + 2
    wrapper = textwrap.TextWrapper(
        width=max(40, width - indent), break_long_words=False, break_on_hyphens=False
    )
    lines = [f"{'CHECK':<{name_width}}  {'STATUS':<6}  DETAIL"]
    for row in rows:
        chunks = wrapper.wrap(row.detail) or [""]
        lines.append(f"{row.check:<{name_width}}  {row.status:<6}  {chunks[0]}")
        lines += [" " * indent + chunk for chunk in chunks[1:]]
    return "\n".join([*lines, "", summary(rows)])


def main(*, fix: bool = False, settings_file: Path | None = None) -> int:
    """Print the report; 1 when any check failed (a run would fail), else 0."""
    rows = run_checks(settings_file, fix=fix)
    print(render(rows))
    return 1 if any(r.status in (FAIL, SKIP) for r in rows) else 0
