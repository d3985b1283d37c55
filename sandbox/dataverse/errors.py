"""Web API errors: the `{"error": {"code", "message"}}` body Dataverse returns, and its codes (§6)."""

from __future__ import annotations

from typing import Any

# Codes from the Dataverse web service error list; "0x0" is what the OData layer (URL and
# payload parsing) reports.
ODATA = "0x0"
OBJECT_DOES_NOT_EXIST = "0x80040217"
SEGMENT_NOT_FOUND = "0x8006088a"
MAX_LENGTH = "0x80044331"
DUPLICATE_RECORD = "0x80040237"
DUPLICATE_DETECTED = "0x80040333"
CONCURRENCY_MISMATCH = "0x80060882"
INVALID_ARGUMENT = "0x80040203"
UNSPECIFIED = "0x80040216"
INVALID_STATE_STATUS = "0x80048408"
PAYLOAD = "0x80048d19"
CHANGE_TRACKING_OFF = "0x80072491"
EXPIRED_VERSION_STAMP = "0x80044352"
INVALID_AUTH_TICKET = "0x8004A100"
EXPIRED_AUTH_TICKET = "0x8004A101"
TOO_MANY_REQUESTS = "0x80072322"
EXECUTION_TIME = "0x80072321"
CONCURRENT_REQUESTS = "0x80072326"
SDK_ENTITY_DOES_NOT_SUPPORT_MESSAGE = "0x80040800"
SQL_TIMEOUT = "0x80044151"
# From the Web service error codes list (powerapps-docs): CannotUseOpportunitySetStateMessage and
# OpportunityIsAlreadyClosed.
OPPORTUNITY_SET_STATE = "0x80100005"
OPPORTUNITY_ALREADY_CLOSED = "0x80040515"


class DataverseError(Exception):
    """An error answer: HTTP status, Dataverse error code and message."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return {"error": {"code": self.code, "message": self.message}}


def bad_request(message: str, code: str = ODATA) -> DataverseError:
    """400 with the OData layer's code unless another is given."""
    return DataverseError(400, code, message)


def unknown_property(name: str, type_name: str) -> DataverseError:
    """400 for a `$select`, `$filter` or `$orderby` naming no column of the table."""
    return bad_request(f"Could not find a property named '{name}' on type '{type_name}'.")


def not_found(logical_name: str, row_id: str) -> DataverseError:
    """404 for a row that does not exist."""
    return DataverseError(
        404, OBJECT_DOES_NOT_EXIST, f"{logical_name} With Id = {row_id} Does Not Exist"
    )


def segment_not_found(segment: str) -> DataverseError:
    """404 for an unknown entity set or path segment (names are case-sensitive)."""
    return DataverseError(
        404, SEGMENT_NOT_FOUND, f"Resource not found for the segment '{segment}'."
    )


def no_resource(url: str) -> DataverseError:
    """404 for a path that names no resource or action for this method."""
    return DataverseError(
        404, ODATA, f"No HTTP resource was found that matches the request URI '{url}'."
    )


def duplicate_key() -> DataverseError:
    """412 when a row with the same key values already exists."""
    return DataverseError(
        412, DUPLICATE_RECORD, "A record with matching key values already exists."
    )


def version_mismatch() -> DataverseError:
    """412 when `If-Match` names another row version."""
    return DataverseError(
        412,
        CONCURRENCY_MISMATCH,
        "The version of the existing record doesn't match the RowVersion property provided.",
    )


def url_too_long(length: int, limit: int) -> DataverseError:
    """414 for a request URL longer than the service accepts."""
    return DataverseError(
        414, ODATA, f"The request URL is too long ({length} characters; the limit is {limit})."
    )


def message_not_supported(message: str, logical_name: str) -> DataverseError:
    """400 for a message the table does not support (e.g. CreateMultiple on some standard tables);
    wording as observed from the service (third-party captures)."""
    return DataverseError(
        400,
        SDK_ENTITY_DOES_NOT_SUPPORT_MESSAGE,
        f"The '{message}' method does not support entities of type '{logical_name}'. "
        "MessageProcessorCache returned MessageProcessor.Empty. ",
    )


class ServerTimeout(Exception):
    """A request ran past the server's time limit: its open transaction rolls back and the whole
    request (a `$batch` too) answers `server_timeout()`. Not a DataverseError on purpose, so that
    no `$batch` part swallows it."""


def server_timeout() -> DataverseError:
    """500 for a request that ran past the 2-minute limit. The documented text of the SQL timeout
    a too-large bulk request meets (bulk-operations.md); the status is UNCONFIRMED."""
    return DataverseError(
        500,
        SQL_TIMEOUT,
        "Sql error: SQL timeout expired. CRM ErrorCode: -2147204783 Sql ErrorCode: -2146232060 "
        "Sql Number: -2",
    )
