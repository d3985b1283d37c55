"""The application user's security role: its table privileges, `RetrieveUserPrivileges`, and the
403 a missing privilege answers.

Dataverse grants privileges named `prv<Operation><Table schema name>` (`prvReadLead`,
`prvWriteContact`) at a depth (`Basic` = the user's own records, `Local` = its business unit,
`Deep` = the unit and its children, `Global` = the organisation). The sandbox's application user
starts with every privilege on every table (lead, contact, account, opportunity) at `Global`;
`PUT /_sandbox/privileges` takes one away or lowers its depth. Only the presence of Create, Read, Write and Delete is enforced (a missing
one → 403); depths, Append and AppendTo are reported, not enforced.
"""

from __future__ import annotations

import uuid
from typing import Any

from sandbox.dataverse.errors import DataverseError
from sandbox.dataverse.schema import ENTITIES, Entity

OPERATIONS = ("Create", "Read", "Write", "Delete", "Append", "AppendTo")
DEPTHS = ("Basic", "Local", "Deep", "Global")
PRIVILEGE_DENIED = "0x80040220"


def privilege_name(operation: str, entity: Entity) -> str:
    """`prvReadLead` for ("Read", lead)."""
    return f"prv{operation}{entity.schema_name}"


def full_role() -> dict[str, str]:
    """Every privilege on every table at `Global` depth (the default security role)."""
    return {
        privilege_name(operation, entity): "Global"
        for entity in ENTITIES.values()
        for operation in OPERATIONS
    }


KNOWN = frozenset(full_role())


def privilege_id(name: str) -> str:
    """A stable PrivilegeId for a privilege name."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-sandbox/privilege/{name}"))


def role_privileges(privileges: dict[str, str], business_unit_id: str) -> list[dict[str, Any]]:
    """`RetrieveUserPrivilegesResponse.RolePrivileges`: one `RolePrivilege` per privilege held."""
    return [
        {
            "Depth": depth,
            "PrivilegeId": privilege_id(name),
            "BusinessUnitId": business_unit_id,
            "PrivilegeName": name,
        }
        for name, depth in sorted(privileges.items())
    ]


def missing_privilege(user_id: str, operation: str, entity: Entity, held: int) -> DataverseError:
    """403 `PrivilegeDenied`, worded like the service's SecLib message."""
    name = privilege_name(operation, entity)
    return DataverseError(
        403,
        PRIVILEGE_DENIED,
        f"Principal user (Id={user_id}, type=8, roleCount=1, privilegeCount={held}, "
        f"accessMode=4), is missing {name} privilege (Id={privilege_id(name)}) on "
        f"OTC={entity.object_type_code} for entity '{entity.logical_name}' "
        f"(LocalizedName='{entity.label}'). context.Caller={user_id}",
    )


def merged(current: dict[str, str], change: dict[str, str | None]) -> dict[str, str]:
    """`current` with `change` applied (a depth sets a privilege, null removes it); a ValueError
    names an unknown privilege or depth."""
    unknown = sorted(set(change) - KNOWN)
    if unknown:
        raise ValueError(f"unknown privileges {unknown}; known: {sorted(KNOWN)}")
    result = dict(current)
    for name, depth in change.items():
        if depth is None:
            result.pop(name, None)
        elif depth not in DEPTHS:
            raise ValueError(f"{name}: depth {depth!r} is not one of {list(DEPTHS)}")
        else:
            result[name] = depth
    return result
