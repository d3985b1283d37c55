"""The sync settings file (`include/config/sync.yaml`): typed model, loader and validation."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from crm_sync.core import Direction

SETTINGS_PATH_ENV = "CRM_SYNC_SETTINGS"
FREQUENCY_ENV = "CRM_SYNC_JOB_FREQUENCY"
DEFAULT_SETTINGS_PATH = Path(__file__).resolve().parents[1] / "config" / "sync.yaml"

JobFrequency = Literal["1h", "2h", "4h", "6h", "8h", "12h", "daily"]

#: The hours between two runs for each job frequency.
FREQUENCY_HOURS: dict[str, int] = {
    "1h": 1,
    "2h": 2,
    "4h": 4,
    "6h": 6,
    "8h": 8,
    "12h": 12,
    "daily": 24,
}
#: The UTC cron expression for each job frequency.
FREQUENCY_CRON: dict[str, str] = {
    name: "0 0 * * *" if hours == 24 else "0 * * * *" if hours == 1 else f"0 */{hours} * * *"
    for name, hours in FREQUENCY_HOURS.items()
}

AC_STANDARD_FIELDS = ("email", "firstName", "lastName", "phone")
_AC_CUSTOM_FIELD = re.compile(r"^field:[A-Z0-9_]{1,64}$")
_DATAVERSE_COLUMN = re.compile(r"^[a-z][a-z0-9_]{0,99}$")


class SettingsError(ValueError):
    """The settings file cannot be used; the message names the key, the value and what is allowed."""


class Entity(StrEnum):
    """A Dynamics 365 table the sync covers."""

    LEAD = "lead"
    CONTACT = "contact"

    @property
    def entity_set(self) -> str:
        """The Web API entity set name (`leads`, `contacts`)."""
        return f"{self.value}s"

    @property
    def primary_id(self) -> str:
        """The table's primary key column (`leadid`, `contactid`)."""
        return f"{self.value}id"


class ObjectKind(StrEnum):
    """A Dynamics table synced as an object of its own (not a person): accounts, opportunities."""

    ACCOUNT = "account"
    OPPORTUNITY = "opportunity"

    @property
    def entity_set(self) -> str:
        """The Web API entity set name (`accounts`, `opportunities`)."""
        return "accounts" if self is ObjectKind.ACCOUNT else "opportunities"

    @property
    def primary_id(self) -> str:
        """The table's primary key column (`accountid`, `opportunityid`)."""
        return f"{self.value}id"


class EntityDirection(StrEnum):
    """Which way records of an entity move, as `sync.yaml` says it (a `Direction`, or both)."""

    TWO_WAY = "two_way"
    TO_DYNAMICS365 = Direction.TO_DYNAMICS365.value
    TO_ACTIVECAMPAIGN = Direction.TO_ACTIVECAMPAIGN.value

    def allows(self, direction: Direction) -> bool:
        """Whether records move in `direction`."""
        return self is EntityDirection.TWO_WAY or self.value == direction.value


class FieldDirection(StrEnum):
    """Which way one mapped field moves, as `sync.yaml` says it."""

    TWO_WAY = "two_way"
    TO_DYNAMICS365 = "to_dynamics365"
    TO_ACTIVECAMPAIGN = "to_activecampaign"

    def allows(self, direction: Direction) -> bool:
        """Whether the field is written in `direction`."""
        return self is FieldDirection.TWO_WAY or self.value == f"to_{direction.target.value}"


class ConflictRule(StrEnum):
    """Who wins when both sides changed a field since the last sync."""

    MOST_RECENT = "most_recent"
    PREFER_ACTIVECAMPAIGN = "prefer_activecampaign"
    PREFER_DYNAMICS365 = "prefer_dynamics365"
    PREFER_NON_EMPTY = "prefer_non_empty"


class InitialSync(StrEnum):
    """What the first `dynamics365_to_activecampaign` run of an entity reads (no watermark yet)."""

    ON_FIRST_SWITCH_ON = "on_first_switch_on"  # every matching record, once (the native way)
    MANUAL = "manual"  # only changes from then on; `initial_sync_backfill` brings the history


class OnDelete(StrEnum):
    """What a linked record's deletion on one side does to its counterpart on the other."""

    IGNORE = "ignore"  # recorded; the link stays
    TAG = "tag"  # the AC contact is tagged deleted (no type tag); an AC deletion is not re-sent
    UNLINK = "unlink"  # the link ends; both sides stay as they are
    DELETE = "delete"  # the counterpart is deleted too (never the default)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_criteria(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    from crm_connectors.odata import check_filter

    check_filter(value)
    return value.strip()


def _not_tag(value: OnDelete) -> OnDelete:
    if value is OnDelete.TAG:
        raise ValueError(
            "'tag' marks an ActiveCampaign contact; for accounts and opportunities use "
            "ignore, unlink or delete"
        )
    return value


class FieldMap(_Strict):
    """One mapped field: an ActiveCampaign field and a Dataverse column."""

    activecampaign: str
    dynamics365: str
    direction: FieldDirection = FieldDirection.TWO_WAY
    conflict: ConflictRule | None = None

    @field_validator("activecampaign")
    @classmethod
    def _ac_field(cls, value: str) -> str:
        if value in AC_STANDARD_FIELDS or _AC_CUSTOM_FIELD.match(value):
            return value
        allowed = ", ".join(AC_STANDARD_FIELDS)
        raise ValueError(
            f"'{value}' is not an ActiveCampaign field; allowed: {allowed}, field:<TAG>"
        )

    @field_validator("dynamics365")
    @classmethod
    def _dv_column(cls, value: str) -> str:
        if _DATAVERSE_COLUMN.match(value):
            return value
        raise ValueError(f"'{value}' is not a Dataverse column logical name (lower case, a-z0-9_)")

    @property
    def custom_field_tag(self) -> str | None:
        """The personalization tag when this is an AC custom field, else None."""
        return self.activecampaign.removeprefix("field:") if self.is_custom else None

    @property
    def is_custom(self) -> bool:
        """Whether the AC side is a custom field."""
        return self.activecampaign.startswith("field:")


class EntitySettings(_Strict):
    """The data configuration of one entity."""

    enabled: bool = True
    direction: EntityDirection = EntityDirection.TWO_WAY
    record_criteria: str | None = None
    initial_sync: InitialSync = InitialSync.ON_FIRST_SWITCH_ON
    on_delete: OnDelete = OnDelete.TAG
    lead_topic: str = "ActiveCampaign lead"

    _criteria = field_validator("record_criteria")(_check_criteria)

    def moves(self, direction: Direction) -> bool:
        """Whether records of this entity move in `direction`."""
        return self.enabled and self.direction.allows(direction)


AC_ACCOUNT_FIELDS = ("name", "accountUrl")
#: Dynamics `salesstage` options (opportunity.md) as `opportunities.stages` names them.
SALES_STAGES = {0: "qualify", 1: "develop", 2: "propose", 3: "close"}


class AccountField(FieldMap):
    """One mapped account field: an AC account attribute and a Dataverse account column."""

    @field_validator("activecampaign")
    @classmethod
    def _ac_field(cls, value: str) -> str:
        if value in AC_ACCOUNT_FIELDS:
            return value
        raise ValueError(
            f"'{value}' is not an ActiveCampaign account field; allowed: "
            + ", ".join(AC_ACCOUNT_FIELDS)
        )


class AccountSettings(_Strict):
    """Accounts <-> AC accounts: matched on name (and website domain), fields mapped."""

    enabled: bool = False
    direction: EntityDirection = EntityDirection.TWO_WAY
    record_criteria: str | None = None
    initial_sync: InitialSync = InitialSync.ON_FIRST_SWITCH_ON
    # Contacts are put on their account on both sides (parentcustomerid <-> accountContacts).
    associate_contacts: bool = True
    # A linked account deleted in Dynamics: ignore | unlink | delete (`tag` is for people).
    on_delete: OnDelete = OnDelete.UNLINK
    field_mapping: tuple[AccountField, ...] = (
        AccountField(activecampaign="name", dynamics365="name"),
        AccountField(activecampaign="accountUrl", dynamics365="websiteurl"),
    )

    _criteria = field_validator("record_criteria")(_check_criteria)
    _on_delete = field_validator("on_delete")(_not_tag)

    @model_validator(mode="after")
    def _mapping_rules(self) -> AccountSettings:
        where = "accounts.field_mapping"
        if not any(
            f.activecampaign == "name" and f.dynamics365 == "name" for f in self.field_mapping
        ):
            raise ValueError(f"{where}: the name mapping (name <-> name) is the match key")
        seen: set[str] = set()
        for f in self.field_mapping:
            if f.activecampaign in seen:
                raise ValueError(f"{where}: '{f.activecampaign}' mapped twice")
            seen.add(f.activecampaign)
            if f.activecampaign == "name" and f.direction != FieldDirection.TWO_WAY:
                raise ValueError(f"{where}: the name mapping must be two_way")
            if self.direction != EntityDirection.TWO_WAY and f.direction != FieldDirection.TWO_WAY:
                raise ValueError(
                    f"{where}.{f.activecampaign}: a per-field direction is allowed only when "
                    f"accounts.direction is two_way (it is {self.direction.value})"
                )
        return self

    def moves(self, direction: Direction) -> bool:
        """Whether accounts move in `direction`."""
        return self.enabled and self.direction.allows(direction)


class OpportunitySettings(_Strict):
    """Opportunities -> AC deals (one way, as the native integration)."""

    enabled: bool = False
    record_criteria: str | None = None
    initial_sync: InitialSync = InitialSync.ON_FIRST_SWITCH_ON
    # The AC pipeline deals go to (by title; created with the stages below when missing).
    pipeline: Annotated[str, Field(min_length=1, max_length=255)] = "Dynamics 365"
    # Lowercase ISO 4217 code of the pipeline; Dynamics values are read in this currency.
    currency: Annotated[str, Field(pattern=r"^[a-z]{3}$")] = "usd"
    # Dynamics sales stage -> AC stage title of that pipeline (every stage must be named).
    stages: dict[str, Annotated[str, Field(min_length=1, max_length=255)]] = Field(
        default_factory=lambda: {
            "qualify": "Qualify",
            "develop": "Develop",
            "propose": "Propose",
            "close": "Close",
        }
    )
    # The AC user owning a deal: by the Dynamics owner's id, else the default.
    owner_default: Annotated[str, Field(pattern=r"^[0-9]+$")] = "1"
    owners: dict[str, Annotated[str, Field(pattern=r"^[0-9]+$")]] = Field(default_factory=dict)
    # A linked opportunity deleted in Dynamics: ignore | unlink | delete (its deal).
    on_delete: OnDelete = OnDelete.UNLINK

    _criteria = field_validator("record_criteria")(_check_criteria)
    _on_delete = field_validator("on_delete")(_not_tag)

    @field_validator("owners")
    @classmethod
    def _owner_ids(cls, value: dict[str, str]) -> dict[str, str]:
        # Dataverse ids are GUIDs, compared in lower case whatever case the file uses.
        return {str(k).strip().lower(): v for k, v in value.items()}

    @field_validator("stages")
    @classmethod
    def _every_stage(cls, value: dict[str, str]) -> dict[str, str]:
        wanted = set(SALES_STAGES.values())
        unknown = set(value) - wanted
        if unknown or set(value) != wanted:
            raise ValueError(
                "name an AC stage for each Dynamics sales stage: "
                + ", ".join(SALES_STAGES.values())
                + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
            )
        return value

    def stage_of(self, sales_stage: Any) -> str:
        """The AC stage title of a Dynamics `salesstage` value (empty: the first stage)."""
        try:
            return self.stages[SALES_STAGES[int(sales_stage)]]
        except (TypeError, ValueError, KeyError):
            return self.stages[SALES_STAGES[0]]

    def owner_of(self, dynamics_owner: Any) -> str:
        """The AC user id of a Dynamics owner id."""
        return self.owners.get(str(dynamics_owner).lower(), self.owner_default)


class Safety(_Strict):
    """Thresholds of the two circuit breakers."""

    max_quarantine_share: Annotated[float, Field(ge=0, le=1)] = 0.2
    quarantine_share_min_batch: Annotated[int, Field(ge=0)] = 20
    max_change_share: Annotated[float, Field(ge=0, le=1)] = 0.1
    mass_change_min_linked: Annotated[int, Field(ge=0)] = 100


class Incremental(_Strict):
    """How incremental reads overlap the stored watermarks."""

    overlap_minutes: Annotated[int, Field(ge=0, le=1440)] = 10
    # AC contacts scanned for deletions per AC -> Dynamics run (100 per request), in turn.
    deletion_scan_per_run: Annotated[int, Field(ge=0, le=100_000)] = 300


_CONN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")
# An address, not a URL: no "/" or ":" (a pasted `smtp://user:password@host` is refused).
_EMAIL_ADDRESS = re.compile(r"^[^@\s,;<>/:]+@[^@\s,;<>/:]+\.[^@\s,;<>/:]+$")


def _conn_id(value: str) -> str:
    if _CONN_ID.match(value):
        return value
    raise ValueError(
        "name an Airflow connection (letters, digits, '_', '.', '-'): its credentials stay in "
        "the connection, never in sync.yaml"
    )


class _Channel(_Strict):
    """A channel of the alerts: an Airflow connection, which holds its credentials."""

    type: str
    conn_id: str

    _conn = field_validator("conn_id")(_conn_id)

    @property
    def name(self) -> str:
        """How logs and reports name the channel (`email:smtp_default`)."""
        return f"{self.type}:{self.conn_id}"


class EmailChannel(_Channel):
    """Alerts by e-mail through an Airflow SMTP connection (`SmtpNotifier`)."""

    type: Literal["email"]
    conn_id: str = "smtp_default"
    to: Annotated[tuple[str, ...], Field(min_length=1)]
    # The sender; None: the connection's `from_email` extra.
    from_email: str | None = None

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for n, address in enumerate(value):
            if not _EMAIL_ADDRESS.match(address):
                raise ValueError(f"item {n} is not an e-mail address (one address per item)")
        return value

    @field_validator("from_email")
    @classmethod
    def _sender(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL_ADDRESS.match(value):
            raise ValueError("not an e-mail address")
        return value


class SlackChannel(_Channel):
    """Alerts to a Slack incoming webhook held by an Airflow connection."""

    type: Literal["slack"]
    conn_id: str = "slack_webhook_default"


class AppriseChannel(_Channel):
    """Alerts to the Apprise URLs held by an Airflow connection (its `config` extra)."""

    type: Literal["apprise"]
    conn_id: str = "apprise_default"


AlertChannel = Annotated[EmailChannel | SlackChannel | AppriseChannel, Field(discriminator="type")]
CHANNEL_TYPES = ("email", "slack", "apprise")


class Alerts(_Strict):
    """Who is told, and of what: sent through Airflow's notifiers; no channel, no alert."""

    channels: tuple[AlertChannel, ...] = ()
    # A run failed (after its retries).
    run_failed: bool = True
    # A circuit breaker stopped a run before it wrote.
    breaker_tripped: bool = True
    # More than this many records newly quarantined by one run; None: off.
    quarantine_growth: Annotated[int, Field(ge=0)] | None = None
    # A direction with no successful run for more than this many times job_frequency; None: off.
    stalled_after: Annotated[float, Field(ge=1, le=1000)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _channel_types(cls, raw: Any) -> Any:
        # Checked here, on the raw mapping, so that the errors say what is allowed and never
        # repeat a value pasted into conn_id (it might be a URL with a password).
        channels = raw.get("channels") if isinstance(raw, dict) else None
        if not isinstance(channels, list | tuple):
            return raw
        allowed = ", ".join(CHANNEL_TYPES)
        for index, channel in enumerate(channels):
            where = f"channels.{index}"
            if not isinstance(channel, dict):
                continue
            kind = channel.get("type")
            if kind is None:
                raise ValueError(f"{where}: 'type' is missing; one of {allowed}")
            if kind not in CHANNEL_TYPES:
                raise ValueError(f"{where}: type '{kind}' is not a channel type; one of {allowed}")
            conn_id = channel.get("conn_id")
            if conn_id is not None and not (isinstance(conn_id, str) and _CONN_ID.match(conn_id)):
                raise ValueError(
                    f"{where}.conn_id: name an Airflow connection (letters, digits, '_', '.', "
                    "'-'): its credentials stay in the connection, never in sync.yaml"
                )
        return raw

    @model_validator(mode="after")
    def _distinct(self) -> Alerts:
        names = [channel.name for channel in self.channels]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"channels: '{name}' is listed twice")
        return self

    @property
    def enabled(self) -> bool:
        """Whether any alert can be sent (a channel is configured)."""
        return bool(self.channels)


class SyncSettings(_Strict):
    """The whole settings file."""

    job_frequency: JobFrequency = "1h"
    entities: dict[Entity, EntitySettings] = Field(
        default_factory=lambda: {e: EntitySettings() for e in Entity}
    )
    field_mapping: dict[Entity, tuple[FieldMap, ...]]
    accounts: AccountSettings = AccountSettings()
    opportunities: OpportunitySettings = OpportunitySettings()
    conflict_rule: ConflictRule = ConflictRule.MOST_RECENT
    safety: Safety = Safety()
    incremental: Incremental = Incremental()
    staging: str = "staging"
    alerts: Alerts = Alerts()

    @model_validator(mode="after")
    def _mapping_rules(self) -> SyncSettings:
        for entity in Entity:
            self.entities.setdefault(entity, EntitySettings(enabled=False))
        for entity, fields in self.field_mapping.items():
            where = f"field_mapping.{entity.value}"
            if not any(
                f.activecampaign == "email" and f.dynamics365 == "emailaddress1" for f in fields
            ):
                raise ValueError(
                    f"{where}: the email mapping (email <-> emailaddress1) cannot be removed: "
                    "email is the match key"
                )
            seen_ac, seen_dv = set(), set()
            for f in fields:
                if f.activecampaign in seen_ac or f.dynamics365 in seen_dv:
                    raise ValueError(
                        f"{where}: '{f.activecampaign}' or '{f.dynamics365}' mapped twice"
                    )
                seen_ac.add(f.activecampaign)
                seen_dv.add(f.dynamics365)
                if f.activecampaign == "email" and f.direction != FieldDirection.TWO_WAY:
                    raise ValueError(f"{where}: the email mapping must be two_way")
                entity_direction = self.entities[entity].direction
                if (
                    entity_direction != EntityDirection.TWO_WAY
                    and f.direction != FieldDirection.TWO_WAY
                ):
                    raise ValueError(
                        f"{where}.{f.activecampaign}: a per-field direction is allowed only when "
                        f"entities.{entity.value}.direction is two_way (it is {entity_direction.value})"
                    )
        for entity in Entity:
            if self.entities[entity].enabled and entity not in self.field_mapping:
                raise ValueError(f"field_mapping.{entity.value}: missing for an enabled entity")
        return self

    @property
    def schedule(self) -> str:
        """The UTC cron expression of the job frequency."""
        return FREQUENCY_CRON[self.job_frequency]

    @property
    def period(self) -> timedelta:
        """The time between two scheduled runs."""
        return timedelta(hours=FREQUENCY_HOURS[self.job_frequency])

    def mapping(self, entity: Entity) -> tuple[FieldMap, ...]:
        """The field mapping of `entity`."""
        return self.field_mapping.get(entity, ())

    def conflict_rule_for(self, field: FieldMap) -> ConflictRule:
        """The conflict rule that decides `field`."""
        return field.conflict or self.conflict_rule


def _describe(error: ErrorDetails, source: str) -> str:
    location = ".".join(str(part) for part in error["loc"] if part not in ("", "function-after"))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{source}: unknown key '{location}'"
    value = error.get("input")
    # A value pasted into `alerts` may be a URL with a password in it: never repeated.
    secret = location.startswith("alerts")
    shown = "" if isinstance(value, dict | list) or value is None or secret else f" (got {value!r})"
    where = f"{location}: " if location else ""
    return f"{source}: {where}{message}{shown}"


def parse_settings(raw: dict[str, Any], source: str = "sync.yaml") -> SyncSettings:
    """Validate a settings mapping, raising `SettingsError` with one line per problem."""
    frequency = os.environ.get(FREQUENCY_ENV)
    if frequency is not None:
        if frequency not in FREQUENCY_CRON:
            allowed = ", ".join(FREQUENCY_CRON)
            raise SettingsError(
                f"{FREQUENCY_ENV}: '{frequency}' is not a job frequency; allowed values: {allowed}"
            )
        raw = {**raw, "job_frequency": frequency}
    try:
        return SyncSettings.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(error, source) for error in exc.errors()]
        if any("job_frequency" in line for line in lines):
            lines.append(f"allowed job_frequency values: {', '.join(FREQUENCY_CRON)}")
        raise SettingsError("invalid sync settings:\n  " + "\n  ".join(lines)) from None


def settings_path() -> Path:
    """The settings file in use: `$CRM_SYNC_SETTINGS` or `include/config/sync.yaml`."""
    return Path(os.environ.get(SETTINGS_PATH_ENV) or DEFAULT_SETTINGS_PATH)


def load_settings(path: Path | None = None) -> SyncSettings:
    """Read and validate the settings file."""
    path = path or settings_path()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise SettingsError(f"settings file not found: {path} (set {SETTINGS_PATH_ENV})") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path.name}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path.name}: the top level must be a mapping of keys")
    return parse_settings(raw, source=path.name)


@cache
def _cached(path: str, mtime: float, frequency: str | None) -> SyncSettings:
    return load_settings(Path(path))


def current_settings() -> SyncSettings:
    """The settings, re-read only when the file or the frequency override changes."""
    path = settings_path()
    mtime = path.stat().st_mtime if path.exists() else 0.0
    return _cached(str(path), mtime, os.environ.get(FREQUENCY_ENV))
