"""What the sync checks against Dataverse before it writes or while it reads (issue 13): mapped
columns must be writable when ActiveCampaign → Dynamics 365 writes them, and a 400 to the read
of changed rows names the mapping or the `record_criteria` it comes from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from crm_connectors.dynamics365 import ColumnInfo, TableInfo
from crm_connectors.errors import ClientError, ServerError
from crm_sync.errors import ConfigurationError
from crm_sync.flows.dataverse import changed_rows, target_rules
from crm_sync.settings import Entity, FieldMap

COLUMNS = {
    "emailaddress1": ColumnInfo("emailaddress1", "String", 100),
    "lastname": ColumnInfo("lastname", "String", 50),
    "subject": ColumnInfo("subject", "String", 300),
    "companyname": ColumnInfo("companyname", "String", 100),
    "fullname": ColumnInfo("fullname", "String", 160, False, False),
    "leadid": ColumnInfo("leadid", "Uniqueidentifier", None, True, False),
}


class MetadataHook:
    """The part of `Dynamics365Hook` that `target_rules` uses, with fixed lead metadata."""

    def check_columns(self, entity_set: str, columns: list[str]) -> TableInfo:
        info = TableInfo("lead", entity_set, "leadid", COLUMNS)
        info.check_columns(columns)
        return info


def mapped(ac: str, column: str, direction: str = "two_way") -> FieldMap:
    return FieldMap(activecampaign=ac, dynamics365=column, direction=direction)


def test_a_column_dataverse_ignores_on_write_refuses_the_run() -> None:
    written = [mapped("email", "emailaddress1"), mapped("field:COMPANY", "fullname")]
    with pytest.raises(ConfigurationError) as caught:
        target_rules(MetadataHook(), Entity.LEAD, ["emailaddress1", "fullname"], written=written)
    message = str(caught.value)
    assert "'fullname' is not valid for create or update" in message
    assert "field_mapping.lead maps field:COMPANY to it two_way" in message
    assert "to_activecampaign" in message and "another column" in message


def test_a_column_valid_for_create_only_is_refused_for_update() -> None:
    written = [mapped("field:LEAD_ID", "leadid", "to_dynamics365")]
    with pytest.raises(ConfigurationError, match="'leadid' is not valid for update"):
        target_rules(MetadataHook(), Entity.LEAD, ["leadid"], written=written)


def test_a_read_only_column_read_one_way_is_fine() -> None:
    rules = target_rules(MetadataHook(), Entity.LEAD, ["emailaddress1", "fullname"], written=[])
    assert rules.max_length["fullname"] == 160


class FailingReadHook:
    """A hook whose read of changed rows is answered with `error` (when the rows are read)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def query(self, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        raise self.error
        yield {}  # pragma: no cover

    modified_since = query


def _bad_request(message: str) -> ClientError:
    return ClientError(message, service="dynamics365", status=400, code="0x0")


def test_a_refused_record_criteria_is_named_as_a_configuration_error() -> None:
    hook = FailingReadHook(_bad_request("A binary operator with incompatible types was detected."))
    with pytest.raises(ConfigurationError) as caught:
        changed_rows(hook, Entity.LEAD, ["emailaddress1"], since=None, criteria="statecode eq 'x'")
    message = str(caught.value)
    assert "entities.lead.record_criteria in sync.yaml" in message
    assert "incompatible types" in message and "configuration error" in message


def test_a_mapped_column_the_table_lacks_names_the_mapping() -> None:
    hook = FailingReadHook(
        _bad_request(
            "Could not find a property named 'nosuch' on type 'Microsoft.Dynamics.CRM.lead'."
        )
    )
    with pytest.raises(ConfigurationError, match=r"field_mapping\.contact"):
        changed_rows(
            hook, Entity.CONTACT, ["emailaddress1", "nosuch"], since=None, criteria="a eq 1"
        )


def test_other_read_failures_are_not_configuration_errors() -> None:
    unavailable = ServerError("busy", service="dynamics365", status=503)
    with pytest.raises(ServerError):
        changed_rows(
            FailingReadHook(unavailable),
            Entity.LEAD,
            ["emailaddress1"],
            since=None,
            criteria="a eq 1",
        )
    with pytest.raises(ClientError):
        changed_rows(
            FailingReadHook(_bad_request("bad")), Entity.LEAD, ["emailaddress1"], since=None,
            criteria=None,
        )  # fmt: skip
