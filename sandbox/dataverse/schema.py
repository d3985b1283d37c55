"""The emulated tables (lead, contact, account, opportunity): columns, types, MaxLengths, value
ranges, state/status pairs (§7) and the relationships' delete behaviour.

Sources beyond the reference notes (which cover leads and contacts only): the account and contact
table references in MicrosoftDocs/powerapps-docs (`reference/entities/account.md`, `contact.md`,
2023) and the opportunity reference in MicrosoftDocs/dynamics-365-customer-engagement
(`ce/developer/entities/opportunity.md`, 2017): MaxLength, MinValue/MaxValue, RequiredLevel,
DateOnly behaviour, states and statuses, and each relationship's CascadeConfiguration.Delete.
Anything not found there is marked UNCONFIRMED where it is defined."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal[
    "uuid", "string", "memo", "int", "bigint", "bool", "picklist", "state", "status", "datetime",
    "date", "lookup", "money",
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
    # A DateTime column with the DateOnly behaviour is an Edm.Date in the Web API ("2024-05-31").
    "date": "Edm.Date",
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
    "date": "DateTime",
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
    "date": "DateTimeAttributeMetadata",
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
    # MinValue/MaxValue of Integer and Money columns (values outside are refused).
    min_value: float | None = None
    max_value: float | None = None

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


ACCOUNT_ADDRESS = (
    "address1_line1", "address1_line2", "address1_line3", "address1_city",
    "address1_stateorprovince", "address1_county", "address1_postalcode", "address1_country",
    "address1_composite",
)  # fmt: skip


def _account() -> Entity:
    # account.md (powerapps-docs, 2023): name 160 ApplicationRequired, accountnumber 20,
    # emailaddress1..3 100, telephone1 "Main Phone" / telephone2 "Other Phone" / fax 50,
    # websiteurl 200 (Url), address1_* as on contacts, description Memo 2000, numberofemployees
    # Integer 0..1,000,000,000, revenue Money 0..100,000,000,000,000 (precision 2),
    # primarycontactid Lookup -> contact, parentaccountid Lookup -> account; statecode 0 Active
    # (default status 1), 1 Inactive (2). originatingleadid: what QualifyLead fills in.
    shared = {c.name: c for c in _common_columns(mobile_length=50, address_name_length=200)}
    columns = [
        Column("accountid", "uuid", "Account", required="SystemRequired", valid_for_update=False),
        _string("name", "Account Name", 160, required="ApplicationRequired"),
        _string("accountnumber", "Account Number", 20),
        shared["emailaddress1"],
        shared["emailaddress2"],
        shared["emailaddress3"],
        _string("telephone1", "Main Phone", 50, fmt="Phone"),
        _string("telephone2", "Other Phone", 50, fmt="Phone"),
        shared["fax"],
        shared["websiteurl"],
        *(shared[name] for name in ACCOUNT_ADDRESS),
        shared["description"],
        Column(
            "numberofemployees",
            "int",
            "Number of Employees",
            min_value=0,
            max_value=1_000_000_000,
        ),
        Column("revenue", "money", "Annual Revenue", min_value=0, max_value=100_000_000_000_000),
        Column("primarycontactid", "lookup", "Primary Contact", target="contact"),
        Column("parentaccountid", "lookup", "Parent Account", target="account"),
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
SALES_STAGES = {0: "Qualify", 1: "Develop", 2: "Propose", 3: "Close"}
OPPORTUNITY_RATINGS = {1: "Hot", 2: "Warm", 3: "Cold"}
# Money columns of an opportunity: -1,000,000,000,000 .. 1,000,000,000,000 (opportunity.md).
_MONEY_LIMIT = 1_000_000_000_000


def _opportunity() -> Entity:
    # opportunity.md (dynamics-365-customer-engagement, 2017): name "Topic" String 300
    # ApplicationRequired; customerid Customer (account, contact) ApplicationRequired;
    # parentaccountid / parentcontactid Lookups; estimatedvalue and actualvalue Money
    # (-1e12..1e12, precision 2; actualvalue "defaults to the Est. Revenue value when an
    # opportunity is won"); estimatedclosedate and actualclosedate DateTime with the DateOnly
    # behaviour; closeprobability Integer 0..100; stepname "Pipeline Phase" String 200;
    # salesstage Picklist 0 Qualify .. 3 Close; opportunityratingcode 1 Hot, 2 Warm, 3 Cold;
    # description Memo 2000; originatingleadid read-only after create; statecode 0 Open (default
    # status 1), 1 Won (3), 2 Lost (4); statuscode 1 In Progress, 2 On Hold, 3 Won, 4 Canceled,
    # 5 Out-Sold. Not emulated: transactioncurrencyid (the reference notes do not mention it and
    # the sandbox has no currency table), the product/pricing columns and the BPF columns.
    low, high = -_MONEY_LIMIT, _MONEY_LIMIT
    columns = [
        Column(
            "opportunityid",
            "uuid",
            "Opportunity",
            required="SystemRequired",
            valid_for_update=False,
        ),
        _string("name", "Topic", 300, required="ApplicationRequired"),
        Column("description", "memo", "Description", max_length=2000),
        Column("parentaccountid", "lookup", "Account", target="account"),
        Column("parentcontactid", "lookup", "Contact", target="contact"),
        Column(
            "customerid",
            "lookup",
            "Potential Customer",
            required="ApplicationRequired",
            targets=("account", "contact"),
        ),
        Column("estimatedvalue", "money", "Est. Revenue", min_value=low, max_value=high),
        Column("actualvalue", "money", "Actual Revenue", min_value=low, max_value=high),
        Column("estimatedclosedate", "date", "Est. Close Date"),
        Column("actualclosedate", "date", "Actual Close Date"),
        Column("closeprobability", "int", "Probability", min_value=0, max_value=100),
        _string("stepname", "Pipeline Phase", 200),
        Column("salesstage", "picklist", "Sales Stage", options=SALES_STAGES),
        Column("opportunityratingcode", "picklist", "Rating", options=OPPORTUNITY_RATINGS),
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


DeleteBehavior = Literal["Cascade", "RemoveLink"]


@dataclass(frozen=True)
class Relationship:
    """A one-to-many relationship: rows of `entity_set` point at a `referenced` row through the
    lookup `column`; `delete` is what deleting the referenced row does to them
    (CascadeConfiguration.Delete: Cascade deletes them too, RemoveLink clears the lookup)."""

    schema_name: str
    referenced: str
    entity_set: str
    column: str
    delete: DeleteBehavior


# Every behaviour below is the CascadeConfiguration the table references document: account.md
# and contact.md (powerapps-docs, 2023) for contact_customer_accounts (Cascade),
# contact_customer_contacts, account_primary_contact and account_parent_account (RemoveLink);
# account.md and contact.md (dynamics-365-customer-engagement) for opportunity_customer_accounts
# and opportunity_customer_contacts (Cascade; also stated in "Entity relationship behavior") and
# opportunity_parent_account / opportunity_parent_contact (RemoveLink). Not emulated: the lead's
# lookups (parentaccountid, parentcontactid) and originatingleadid, which keep pointing at a
# deleted row, as before.
RELATIONSHIPS: tuple[Relationship, ...] = (
    Relationship("contact_customer_accounts", "account", "contacts", "parentcustomerid", "Cascade"),
    Relationship(
        "opportunity_customer_accounts", "account", "opportunities", "customerid", "Cascade"
    ),
    Relationship(
        "opportunity_customer_contacts", "contact", "opportunities", "customerid", "Cascade"
    ),
    Relationship(
        "contact_customer_contacts", "contact", "contacts", "parentcustomerid", "RemoveLink"
    ),
    Relationship(
        "account_primary_contact", "contact", "accounts", "primarycontactid", "RemoveLink"
    ),
    Relationship("account_parent_account", "account", "accounts", "parentaccountid", "RemoveLink"),
    Relationship(
        "opportunity_parent_account", "account", "opportunities", "parentaccountid", "RemoveLink"
    ),
    Relationship(
        "opportunity_parent_contact", "contact", "opportunities", "parentcontactid", "RemoveLink"
    ),
)


ENTITIES: dict[str, Entity] = {
    e.entity_set: e for e in (_lead(), _contact(), _account(), _opportunity())
}
BY_LOGICAL_NAME: dict[str, Entity] = {e.logical_name: e for e in ENTITIES.values()}
