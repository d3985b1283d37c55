"""`$batch` wire format (§4): multipart/mixed requests with change sets, parsed and rendered."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus

from sandbox.dataverse import errors
from sandbox.dataverse.errors import DataverseError, bad_request

CRLF = b"\r\n"
MAX_REQUESTS = 1000


@dataclass
class BatchRequest:
    """One request inside a batch (or a change set)."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    content_id: str | None = None


@dataclass
class ChangeSet:
    """Requests that succeed or fail together."""

    requests: list[BatchRequest] = field(default_factory=list)


@dataclass
class PartResponse:
    """One answered request, ready to render as an `application/http` part."""

    status: int
    headers: dict[str, str]
    body: bytes
    content_id: str | None = None


@dataclass
class ChangeSetResponse:
    """The answers of a change set that succeeded."""

    parts: list[PartResponse]


def boundary_of(content_type: str | None) -> str:
    """The boundary parameter of a multipart/mixed Content-Type."""
    match = re.search(r'boundary="?([^";]+)"?', content_type or "", re.IGNORECASE)
    if not (content_type or "").lower().startswith("multipart/mixed") or match is None:
        raise bad_request(
            "The batch request must have a 'Content-Type' header of 'multipart/mixed' with a "
            "boundary parameter."
        )
    return match.group(1)


def _unreadable() -> DataverseError:
    return bad_request(
        "Error identified in Payload provided by the user for Entity :'', For more information on "
        "this error please follow this help link https://go.microsoft.com/fwlink/?linkid=2195293"
        "  ---->  InnerException : Microsoft.OData.ODataException: Stream was not readable.",
        errors.PAYLOAD,
    )


def _split(body: bytes, boundary: str) -> list[bytes]:
    delimiter = b"--" + boundary.encode()
    if delimiter + CRLF not in body:
        # The service reads CRLF-delimited multipart only; bare LF line endings fail.
        raise _unreadable()
    chunks = body.split(delimiter)
    closing = [i for i, chunk in enumerate(chunks) if chunk.startswith(b"--")]
    if not closing:
        raise _unreadable()
    parts = []
    for chunk in chunks[1 : closing[0]]:
        if not chunk.startswith(CRLF):
            raise _unreadable()
        parts.append(chunk[2:-2] if chunk.endswith(CRLF) else chunk[2:])
    return parts


def _headers_and_body(chunk: bytes) -> tuple[dict[str, str], bytes]:
    head, sep, body = chunk.partition(CRLF + CRLF)
    if not sep:
        head, body = chunk, b""
    headers: dict[str, str] = {}
    for line in head.split(CRLF):
        if not line.strip():
            continue
        name, colon, value = line.decode("utf-8").partition(":")
        if not colon:
            raise _unreadable()
        headers[name.strip().lower()] = value.strip()
    return headers, body


def _http_request(chunk: bytes, content_id: str | None) -> BatchRequest:
    line, _, rest = chunk.partition(CRLF)
    parts = line.decode("utf-8").split(" ")
    if len(parts) < 2:
        raise _unreadable()
    headers, body = _headers_and_body(rest)
    return BatchRequest(parts[0].upper(), parts[1], headers, body.rstrip(b"\r\n"), content_id)


def parse_batch(content_type: str | None, body: bytes) -> list[BatchRequest | ChangeSet]:
    """The requests and change sets of a `$batch` body, in order."""
    items: list[BatchRequest | ChangeSet] = []
    total = 0
    for chunk in _split(body, boundary_of(content_type)):
        headers, content = _headers_and_body(chunk)
        kind = headers.get("content-type", "").lower()
        if kind.startswith("multipart/mixed"):
            changeset = ChangeSet()
            for inner in _split(content, boundary_of(headers["content-type"])):
                inner_headers, inner_content = _headers_and_body(inner)
                if not inner_headers.get("content-type", "").lower().startswith("application/http"):
                    raise _unreadable()
                changeset.requests.append(
                    _http_request(inner_content, inner_headers.get("content-id"))
                )
            total += len(changeset.requests)
            items.append(changeset)
        elif kind.startswith("application/http"):
            items.append(_http_request(content, headers.get("content-id")))
            total += 1
        else:
            raise _unreadable()
    if total > MAX_REQUESTS:
        raise bad_request(
            f"The number of requests in the batch ({total}) exceeds the limit of {MAX_REQUESTS}.",
            errors.INVALID_ARGUMENT,
        )
    return items


def _render_part(part: PartResponse) -> bytes:
    lines = [b"Content-Type: application/http", b"Content-Transfer-Encoding: binary"]
    if part.content_id is not None:
        lines.append(f"Content-ID: {part.content_id}".encode())
    reason = HTTPStatus(part.status).phrase
    lines += [b"", f"HTTP/1.1 {part.status} {reason}".encode()]
    lines += [f"{k}: {v}".encode() for k, v in part.headers.items()]
    return CRLF.join([*lines, b"", part.body]) + CRLF


def render_batch(items: list[PartResponse | ChangeSetResponse]) -> tuple[str, bytes]:
    """The multipart response body and its Content-Type."""
    boundary = f"batchresponse_{uuid.uuid4()}"
    out = b""
    for item in items:
        out += f"--{boundary}".encode() + CRLF
        if isinstance(item, ChangeSetResponse):
            inner = f"changesetresponse_{uuid.uuid4()}"
            out += f"Content-Type: multipart/mixed; boundary={inner}".encode() + CRLF + CRLF
            for part in item.parts:
                out += f"--{inner}".encode() + CRLF + _render_part(part)
            out += f"--{inner}--".encode() + CRLF
        else:
            out += _render_part(item)
    out += f"--{boundary}--".encode() + CRLF
    return f"multipart/mixed; boundary={boundary}", out
