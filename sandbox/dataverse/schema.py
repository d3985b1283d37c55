"""The emulated tables (lead, contact, and minimal account and opportunity for QualifyLead): columns,
types, MaxLengths and state/status pairs (§7)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal[
    "uuid", "string", "memo", "int", "bigint", "bool", "picklist", "state", "status", "datetime",
    "lookup",
]  # fmt: skip
Required = Literal["None", "Recommended", "ApplicationRequired", "SystemRequired"]

EDM_TYPES: dict[str, str] = {
    "uuid": "Edm.Guid",
    "string": "Edm.String",
    "memo": "Edm.String",
    "int": "Edm.Int32",
    "bigint": "Edm.Int64",
    "bool": "Edm.Boolean",
    "picklist": "Edm.Int32",
    "state": "Edm.Int32",
    "status": "Edm.Int32",
    "datetime": "Edm.DateTimeOffset",
    "lookup": "Edm.Guid",
    "money": "Edm.Decimal",
}
ATTRIBUTE_TYPES: dict[str, str] = {
    "uuid": "Uniqueidentifier",
    "string": "String",
    "memo": "Memo",
    "int": "Integer",
    "bigint": "BigInt",
    "bool": "Boolean",
    "picklist": "Picklist",
    "state": "State",
    "status": "Status",
    "datetime": "DateTime",
    "lookup": "Lookup",
    "money": "Money",
}
METADATA_TYPES: dict[str, str] = {
    "uuid": "UniqueIdentifierAttributeMetadata",
    "string": "StringAttributeMetadata",
    "memo": "MemoAttributeMetadata",
    "int": "IntegerAttributeMetadata",
    "bigint": "BigIntAttributeMetadata",
    "bool": "BooleanAttributeMetadata",
    "picklist": "PicklistAttributeMetadata",
    "state": "StateAttributeMetadata",
    "status": "StatusAttributeMetadata",
    "datetime": "DateTimeAttributeMetadata",
    "lookup": "LookupAttributeMetadata",
    "money": "MoneyAttributeMetadata",
}
# The namespace of every entity and metadata type in URLs, bodies and error messages.
NS = "Microsoft.Dynamics.CRM"
# Only the attributes the Web API lets a client read the length of through the string cast.
STRING_KINDS = frozenset({"string"})


@dataclass(frozen=True)
class Column:
    """One column (attribute) of a table, as the metadata describes it."""

    name: str
    kind: Kind
    label: str
    max_length: int | None = None
    required: Required = "None"
    valid_for_create: bool = True
    valid_for_update: bool = True
    fmt: str | None = None
    target: str | None = None
    options: dict[int, str] = field(default_factory=dict)
    # A customer lookup (account or contact) names several target tables instead of `target`;
    # it is written through one navigation property per target (`parentcustomerid_account`).
    targets: tuple[str, ...] = ()

    @property
    def lookup_targets(self) -> tuple[str, ...]:
        """The tables a lookup can point at."""
        return self.targets or ((self.target,) if self.target else ())

    @property
    def json_name(self) -> str:
        """The property name in JSON bodies: lookups read as `_<name>_value`."""
        return f"_{self.name}_value" if self.kind == "lookup" else self.name

    @property
    def edm_type(self) -> str:
        """The OData primitive type of the column's values."""
        return EDM_TYPES[self.kind]

    @property
    def read_only(self) -> bool:
        """True for columns the server sets (ignored when a client sends them)."""
        return not (self.valid_for_create or self.valid_for_update)


@dataclass(frozen=True)
class Entity:
    """A table: names, key, columns and its state/status model."""

    logical_name: str
    schema_name: str
    entity_set: str
    primary_id: str
    object_type_code: int
    label: str
    columns: dict[str, Column]
    # statecode -> allowed statuscodes, the default status first.
    states: dict[int, tuple[int, ...]]
    primary_name: str = "fullname"
    collection_label: str = ""
    collection_schema_name: str = ""

    @property
    def type_name(self) -> str:
        """The qualified type name used in messages (`Microsoft.Dynamics.CRM.lead`)."""
        return f"{NS}.{self.logical_name}"

    @property
    def metadata_id(self) -> str:
        """A stable MetadataId for the table."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-sandbox/{self.logical_name}"))

    def attribute_id(self, column: str) -> str:
        """A stable MetadataId for one of the table's columns."""
        return str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-sandbox/{self.logical_name}/{column}")
        )

    def by_json_name(self, name: str) -> Column | None:
        """The column whose JSON property is `name` (e.g. `_ownerid_value`)."""
        column = self.columns.get(name)
        if column is not None and column.kind != "lookup":
            return column
        if name.startswith("_") and name.endswith("_value"):
            column = self.columns.get(name[1:-6])
            if column is not None and column.kind == "lookup":
                return column
        return None


def _string(name: str, label: str, max_length: int, **kw: object) -> Column:
    return Column(name, "string", label, max_length=max_length, **kw)  # type: ignore[arg-type]


def _common_columns(*, mobile_length: int, address_name_length: int) -> list[Column]:
    phone = {"fmt": "Phone"}
    return [
        _string("firstname", "First Name", 50, required="Recommended"),
        _string("middlename", "Middle Name", 50),
        _string("fullname", "Name", 160, valid_for_create=False, valid_for_update=False),
        _string("salutation", "Salutation", 100),
        _string("emailaddress1", "Email", 100, fmt="Email"),
        _string("emailaddress2", "Email Address 2", 100, fmt="Email"),
        _string("emailaddress3", "Email Address 3", 100, fmt="Email"),
        _string("telephone1", "Business Phone", 50, **phone),
        _string("telephone2", "Home Phone", 50, **phone),
        _string("telephone3", "Other Phone", 50, **phone),
        _string("mobilephone", "Mobile Phone", mobile_length, **phone),
        _string("fax", "Fax", 50),
        _string("jobtitle", "Job Title", 100),
        _string("websiteurl", "Website", 200, fmt="Url"),
        Column("description", "memo", "Description", max_length=2000),
        _string("address1_name", "Address 1: Name", address_name_length),
        _string("address1_line1", "Street 1", 250),
        _string("address1_line2", "Street 2", 250),
        _string("address1_line3", "Street 3", 250),
        _string("address1_city", "City", 80),
        _string("address1_stateorprovince", "State/Province", 50),
        _string("address1_county", "Address 1: County", 50),
        _string("address1_postalcode", "ZIP/Postal Code", 20),
        _string("address1_postofficebox", "Address 1: Post Office Box", 20),
        _string("address1_country", "Country/Region", 80),
        _string("address1_telephone1", "Address 1: Phone", 50, **phone),
        _string("address1_telephone2", "Address 1: Telephone 2", 50, **phone),
        _string("address1_telephone3", "Address 1: Telephone 3", 50, **phone),
        _string("address1_fax", "Address 1: Fax", 50),
        Column(
            "address1_composite",
            "memo",
            "Address 1",
            max_length=1000,
            valid_for_create=False,
            valid_for_update=False,
        ),
        Column(
            "donotemail", "bool", "Do not allow Emails", options={0: "Allow", 1: "Do Not Allow"}
        ),
        Column(
            "donotbulkemail",
            "bool",
            "Do not allow Bulk Emails",
            options={0: "Allow", 1: "Do Not Allow"},
        ),
        Column(
            "donotphone",
            "bool",
            "Do not allow Phone Calls",
            options={0: "Allow", 1: "Do Not Allow"},
        ),
        Column(
            "donotpostalmail", "bool", "Do not allow Mails", options={0: "Allow", 1: "Do Not Allow"}
        ),
        Column("ownerid", "lookup", "Owner", required="SystemRequired", target="systemuser"),
        Column(
            "createdby",
            "lookup",
            "Created By",
            valid_for_create=False,
            valid_for_update=False,
            target="systemuser",
        ),
        Column(
            "modifiedby",
            "lookup",
            "Modified By",
            valid_for_create=False,
            valid_for_update=False,
            target="systemuser",
        ),
        Column(
            "createdon", "datetime", "Created On", valid_for_create=False, valid_for_update=False
        ),
        Column(
            "modifiedon", "datetime", "Modified On", valid_for_create=False, valid_for_update=False
        ),
        Column(
            "versionnumber",
            "bigint",
            "Version Number",
            valid_for_create=False,
            valid_for_update=False,
        ),
    ]


LEAD_STATES = {0: "Open", 1: "Qualified", 2: "Disqualified"}
LEAD_STATUSES = {
    1: "New", 2: "Contacted", 3: "Qualified", 4: "Lost", 5: "Cannot Contact",
    6: "No Longer Interested", 7: "Canceled",
}  # fmt: skip
LEAD_SOURCES = {
    1: "Advertisement", 2: "Employee Referral", 3: "External Referral", 4: "Partner",
    5: "Public Relations", 6: "Seminar", 7: "Trade Show", 8: "Web", 9: "Word of Mouth", 10: "Other",
}  # fmt: skip


def _lead() -> Entity:
    columns = [
        Column("leadid", "uuid", "Lead", required="SystemRequired", valid_for_update=False),
        _string("lastname", "Last Name", 50, required="ApplicationRequired"),
        *_common_columns(mobile_length=20, address_name_length=100),
        _string("companyname", "Company Name", 100, required="Recommended"),
        _string("subject", "Topic", 300, required="ApplicationRequired"),
        Column("leadsourcecode", "picklist", "Lead Source", options=LEAD_SOURCES),
        Column("parentaccountid", "lookup", "Parent Account for lead", target="account"),
        Column("parentcontactid", "lookup", "Parent Contact for lead", target="contact"),
        *_state_columns(LEAD_STATES, LEAD_STATUSES),
    ]
    return Entity(
        logical_name="lead",
        schema_name="Lead",
        entity_set="leads",
        primary_id="leadid",
        object_type_code=4,
        label="Lead",
        columns={c.name: c for c in columns},
        states={0: (1, 2), 1: (3,), 2: (4, 5, 6, 7)},
    )


def _contact() -> Entity:
    columns = [
        Column("contactid", "uuid", "Contact", required="SystemRequired", valid_for_update=False),
        _string("lastname", "Last Name", 50, required="ApplicationRequired"),
        *_common_columns(mobile_length=50, address_name_length=200),
        _string("company", "Company Name", 50),
        Column("parentcustomerid", "lookup", "Company Name", targets=("account", "contact")),
        Column(
            "originatingleadid", "lookup", "Originating Lead", valid_for_update=False, target="lead"
        ),
        *_state_columns(),
    ]
    return Entity(
        logical_name="contact",
        schema_name="Contact",
        entity_set="contacts",
        primary_id="contactid",
        object_type_code=2,
        label="Contact",
        columns={c.name: c for c in columns},
        states={0: (1,), 1: (2,)},
    )


def _state_columns(
    states: dict[int, str] | None = None, statuses: dict[int, str] | None = None
) -> list[Column]:
    """`statecode` and its `statuscode` (by default 0 Active / 1 Inactive, as contacts and
    accounts have)."""
    return [
        Column(
            "statecode",
            "state",
            "Status",
            required="SystemRequired",
            valid_for_create=False,
            options=states or {0: "Active", 1: "Inactive"},
        ),
        Column(
            "statuscode",
            "status",
            "Status Reason",
            options=statuses or {1: "Active", 2: "Inactive"},
        ),
    ]


def _system_columns() -> list[Column]:
    """Owner, audit columns and the row version every table carries."""
    return [c for c in _common_columns(mobile_length=50, address_name_length=200) if c.name in (
        "ownerid", "createdby", "modifiedby", "createdon", "modifiedon", "versionnumber",
    )]  # fmt: skip


def _account() -> Entity:
    # Minimal: what QualifyLead fills in. Later issues may add columns.
    columns = [
        Column("accountid", "uuid", "Account", required="SystemRequired", valid_for_update=False),
        _string("name", "Account Name", 160, required="ApplicationRequired"),
        _string("emailaddress1", "Email", 100, fmt="Email"),
        _string("telephone1", "Main Phone", 50, fmt="Phone"),
        _string("websiteurl", "Website", 200, fmt="Url"),
        Column(
            "originatingleadid", "lookup", "Originating Lead", valid_for_update=False, target="lead"
        ),
        *_system_columns(),
        *_state_columns(),
    ]
    return Entity(
        logical_name="account",
        schema_name="Account",
        entity_set="accounts",
        primary_id="accountid",
        object_type_code=1,
        label="Account",
        columns={c.name: c for c in columns},
        states={0: (1,), 1: (2,)},
        primary_name="name",
    )


OPPORTUNITY_STATES = {0: "Open", 1: "Won", 2: "Lost"}
OPPORTUNITY_STATUSES = {1: "In Progress", 2: "On Hold", 3: "Won", 4: "Canceled", 5: "Out-Sold"}


def _opportunity() -> Entity:
    columns = [
        Column(
            "opportunityid",
            "uuid",
            "Opportunity",
            required="SystemRequired",
            valid_for_update=False,
        ),
        _string("name", "Topic", 300, required="ApplicationRequired"),
        Column("parentaccountid", "lookup", "Account", target="account"),
        Column("parentcontactid", "lookup", "Contact", target="contact"),
        Column("customerid", "lookup", "Potential Customer", targets=("account", "contact")),
        Column("estimatedvalue", "money", "Est. Revenue"),
        Column(
            "originatingleadid", "lookup", "Originating Lead", valid_for_update=False, target="lead"
        ),
        *_system_columns(),
        *_state_columns(OPPORTUNITY_STATES, OPPORTUNITY_STATUSES),
    ]
    return Entity(
        logical_name="opportunity",
        schema_name="Opportunity",
        entity_set="opportunities",
        primary_id="opportunityid",
        object_type_code=3,
        label="Opportunity",
        columns={c.name: c for c in columns},
        states={0: (1, 2), 1: (3,), 2: (4, 5)},
        primary_name="name",
        collection_label="Opportunities",
        collection_schema_name="Opportunities",
    )


ENTITIES: dict[str, Entity] = {
    e.entity_set: e for e in (_lead(), _contact(), _account(), _opportunity())
}
BY_LOGICAL_NAME: dict[str, Entity] = {e.logical_name: e for e in ENTITIES.values()}
