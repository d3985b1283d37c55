"""`EntityDefinitions`: table and column metadata (LogicalName, EntitySetName, MaxLength, ...)."""

from __future__ import annotations

import re
from typing import Any

from sandbox.dataverse.errors import DataverseError, bad_request, no_resource, segment_not_found
from sandbox.dataverse.odata import FilterParser, evaluate, parse_key
from sandbox.dataverse.schema import (
    ATTRIBUTE_TYPES,
    BY_LOGICAL_NAME,
    METADATA_TYPES,
    NS,
    Column,
    Entity,
)
from sandbox.dataverse.settings import OrgSettings

ENTITY_TYPE = f"{NS}.EntityMetadata"
ATTRIBUTE_TYPE = f"{NS}.AttributeMetadata"


def _label(text: str) -> dict[str, Any]:
    localized = {"Label": text, "LanguageCode": 1033, "IsManaged": True}
    return {"LocalizedLabels": [localized], "UserLocalizedLabel": localized}


def entity_metadata(entity: Entity, settings: OrgSettings) -> dict[str, Any]:
    """The EntityMetadata properties of a table."""
    return {
        "MetadataId": entity.metadata_id,
        "LogicalName": entity.logical_name,
        "SchemaName": entity.schema_name,
        "EntitySetName": entity.entity_set,
        "LogicalCollectionName": entity.entity_set,
        "CollectionSchemaName": entity.collection_schema_name or f"{entity.schema_name}s",
        "PrimaryIdAttribute": entity.primary_id,
        "PrimaryNameAttribute": entity.primary_name,
        "ObjectTypeCode": entity.object_type_code,
        "OwnershipType": "UserOwned",
        "IsActivity": False,
        "IsCustomEntity": False,
        "IsValidForAdvancedFind": True,
        "ChangeTrackingEnabled": settings.change_tracking.get(entity.entity_set, False),
        "CanChangeTrackingBeEnabled": {
            "Value": True,
            "CanBeChanged": False,
            "ManagedPropertyLogicalName": "canchangetrackingbeenabled",
        },
        "IsDuplicateDetectionEnabled": {
            "Value": True,
            "CanBeChanged": True,
            "ManagedPropertyLogicalName": "canchangeduplicatedetection",
        },
        "DisplayName": _label(entity.label),
        "DisplayCollectionName": _label(entity.collection_label or f"{entity.label}s"),
    }


def attribute_metadata(entity: Entity, column: Column) -> dict[str, Any]:
    """The AttributeMetadata properties of a column (with MaxLength for text columns)."""
    data: dict[str, Any] = {
        "@odata.type": f"#{NS}.{METADATA_TYPES[column.kind]}",
        "MetadataId": entity.attribute_id(column.name),
        "LogicalName": column.name,
        "SchemaName": column.name,
        "EntityLogicalName": entity.logical_name,
        "AttributeType": ATTRIBUTE_TYPES[column.kind],
        "AttributeTypeName": {"Value": f"{ATTRIBUTE_TYPES[column.kind]}Type"},
        "IsPrimaryId": column.name == entity.primary_id,
        "IsPrimaryName": column.name == entity.primary_name,
        "IsCustomAttribute": False,
        "IsValidForCreate": column.valid_for_create,
        "IsValidForUpdate": column.valid_for_update,
        "IsValidForRead": True,
        "AttributeOf": None,
        "RequiredLevel": {
            "Value": column.required,
            "CanBeChanged": column.required != "SystemRequired",
            "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings",
        },
        "DisplayName": _label(column.label),
    }
    if column.max_length is not None:
        data["MaxLength"] = column.max_length
        data["DatabaseLength"] = column.max_length * 2
    if column.kind == "string":
        data["Format"] = "Text" if column.fmt in (None, "Phone") else column.fmt
        data["FormatName"] = {"Value": column.fmt or "Text"}
    if column.kind == "lookup":
        data["Targets"] = list(column.lookup_targets)
        if column.targets:
            data["AttributeType"] = "Customer"
            data["AttributeTypeName"] = {"Value": "CustomerType"}
    if column.kind == "money":
        data["Precision"] = 2
        data["PrecisionSource"] = 2
    if column.kind in ("int", "money") and column.min_value is not None:
        data["MinValue"] = column.min_value
        data["MaxValue"] = column.max_value
    if column.kind == "datetime":
        data["Format"] = "DateAndTime"
        data["DateTimeBehavior"] = {"Value": "UserLocal"}
    if column.kind == "date":
        data["Format"] = "DateOnly"
        data["DateTimeBehavior"] = {"Value": "DateOnly"}
    return data


def _project(data: dict[str, Any], select: list[str] | None, type_name: str) -> dict[str, Any]:
    if select is None:
        return data
    out = {k: v for k, v in data.items() if k == "@odata.type"}
    for name in select:
        if name not in data:
            raise bad_request(f"Could not find a property named '{name}' on type '{type_name}'.")
        out[name] = data[name]
    return out


def _select(raw: str | None) -> list[str] | None:
    if raw is None or raw.strip() in ("", "*"):
        return None
    return [p.strip() for p in raw.split(",")]


def _filtered(items: list[dict[str, Any]], raw: str | None, type_name: str) -> list[dict[str, Any]]:
    if raw is None:
        return items
    names = {k for item in items for k in item}

    def resolve(name: str) -> str | None:
        if name not in names:
            return None
        sample = next((i[name] for i in items if i.get(name) is not None), "")
        if isinstance(sample, bool):
            return "Edm.Boolean"
        if isinstance(sample, int):
            return "Edm.Int32"
        return "Edm.String"

    node = FilterParser(raw, resolve, type_name).parse()
    return [item for item in items if evaluate(node, item)]


def metadata_response(
    segments: list[str], options: dict[str, str], settings: OrgSettings, api_base: str
) -> dict[str, Any]:
    """Answer `GET EntityDefinitions...`; `segments` is the path from `EntityDefinitions` on."""
    head = segments[0]
    match = re.fullmatch(r"EntityDefinitions(?:\((.*)\))?", head, re.S)
    if match is None:
        raise segment_not_found(head)
    context = f"{api_base}$metadata#EntityDefinitions"
    select = _select(options.get("$select"))
    if match.group(1) is None:
        if len(segments) > 1:
            raise segment_not_found(segments[1])
        items = [entity_metadata(e, settings) for e in BY_LOGICAL_NAME.values()]
        items = _filtered(items, options.get("$filter"), ENTITY_TYPE)
        value = [_with_expand(e, options, settings) for e in items]
        return {
            "@odata.context": _ctx(context, select),
            "value": [_project(v, _keep_expand(select, options), ENTITY_TYPE) for v in value],
        }
    entity = _entity_by_key(match.group(1))
    if len(segments) == 1:
        body = _with_expand(entity_metadata(entity, settings), options, settings)
        return {
            "@odata.context": _ctx(context, select) + "/$entity",
            **_project(body, _keep_expand(select, options), ENTITY_TYPE),
        }
    return _attributes(entity, segments[1:], options, f"{context}('{entity.metadata_id}')")


def _ctx(context: str, select: list[str] | None) -> str:
    return f"{context}({','.join(select)})" if select else context


def _keep_expand(select: list[str] | None, options: dict[str, str]) -> list[str] | None:
    if select is None or options.get("$expand") is None:
        return select
    return [*select, "Attributes"]


def _with_expand(
    data: dict[str, Any], options: dict[str, str], settings: OrgSettings
) -> dict[str, Any]:
    expand = options.get("$expand")
    if expand is None:
        return data
    match = re.fullmatch(r"Attributes(?:\(\$select=([^)]*)\))?", expand.strip())
    if match is None:
        raise bad_request(f"Could not find a property named '{expand}' on type '{ENTITY_TYPE}'.")
    entity = BY_LOGICAL_NAME[data["LogicalName"]]
    select = _select(match.group(1))
    attributes = [attribute_metadata(entity, c) for c in entity.columns.values()]
    return {**data, "Attributes": [_project(a, select, ATTRIBUTE_TYPE) for a in attributes]}


def _entity_by_key(key: str) -> Entity:
    parsed = parse_key(key)
    if isinstance(parsed, str):
        for entity in BY_LOGICAL_NAME.values():
            if entity.metadata_id == parsed:
                return entity
        raise _no_entity(parsed)
    if set(parsed) != {"LogicalName"}:
        raise bad_request(
            "The key in the request URI is not valid for resource "
            f"'{ENTITY_TYPE}'. Ensure that the names and number of key properties match the "
            f"declared or alternate key properties for the resource '{ENTITY_TYPE}'."
        )
    entity = BY_LOGICAL_NAME.get(str(parsed["LogicalName"]))
    if entity is None:
        raise _no_entity(str(parsed["LogicalName"]))
    return entity


def _no_entity(name: str) -> DataverseError:
    return DataverseError(404, "0x80040217", f"Could not find entity with name or id '{name}'.")


def _attributes(
    entity: Entity, segments: list[str], options: dict[str, str], context: str
) -> dict[str, Any]:
    match = re.fullmatch(r"Attributes(?:\((.*)\))?", segments[0], re.S)
    if match is None:
        raise segment_not_found(segments[0])
    rest = segments[1:]
    cast = None
    if rest:
        cast = rest[0]
        if not cast.startswith(f"{NS}.") or cast[len(NS) + 1 :] not in METADATA_TYPES.values():
            raise segment_not_found(cast)
        if len(rest) > 1:
            raise segment_not_found(rest[1])
    type_name = cast or ATTRIBUTE_TYPE
    select = _select(options.get("$select"))
    columns = list(entity.columns.values())
    if cast is not None:
        columns = [c for c in columns if f"{NS}.{METADATA_TYPES[c.kind]}" == cast]
    items = [attribute_metadata(entity, c) for c in columns]
    suffix = f"/{cast}" if cast else ""
    if match.group(1) is None:
        items = _filtered(items, options.get("$filter"), type_name)
        return {
            "@odata.context": _ctx(f"{context}/Attributes{suffix}", select),
            "value": [_project(i, select, type_name) for i in items],
        }
    parsed = parse_key(match.group(1))
    wanted = parsed.get("LogicalName") if isinstance(parsed, dict) else None
    for item in items:
        if item["LogicalName"] == wanted or item["MetadataId"] == parsed:
            return {
                "@odata.context": _ctx(f"{context}/Attributes{suffix}", select) + "/$entity",
                **_project(item, select, type_name),
            }
    raise no_resource(f"{context}/Attributes({match.group(1)})")
