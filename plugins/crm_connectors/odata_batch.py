"""OData 4.0 `$batch` bodies (multipart/mixed, CRLF) and the parsing of their responses."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

CRLF = "\r\n"
MAX_BATCH_PARTS = 1000


@dataclass(frozen=True)
class BatchOperation:
    """One request inside a `$batch`: method, absolute URL, optional JSON body and headers."""

    method: str
    url: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchResponse:
    """One part of a `$batch` response: its HTTP status, headers and decoded JSON body."""

    status: int
    headers: dict[str, str]
    body: Any = None

    @property
    def ok(self) -> bool:
        """Whether the part succeeded (2xx)."""
        return 200 <= self.status < 300


def build_batch(operations: list[BatchOperation], *, atomic: bool = False) -> tuple[str, bytes]:
    """The `Content-Type` header and body of a `$batch` request.

    With `atomic`, every operation goes into one change set (all succeed or all roll back);
    otherwise each operation is its own part, so one failure does not undo the others.
    """
    if not operations:
        raise ValueError("a $batch needs at least one operation")
    if len(operations) > MAX_BATCH_PARTS:
        raise ValueError(f"a $batch holds at most {MAX_BATCH_PARTS} operations")
    batch = f"batch_{uuid.uuid4()}"
    lines: list[str] = []
    if atomic:
        changeset = f"changeset_{uuid.uuid4()}"
        lines += [f"--{batch}", f"Content-Type: multipart/mixed; boundary={changeset}", ""]
        for number, operation in enumerate(operations, start=1):
            lines += [f"--{changeset}", *_part(operation, content_id=number)]
        lines += [f"--{changeset}--", ""]
    else:
        for operation in operations:
            lines += [f"--{batch}", *_part(operation, content_id=None)]
    lines += [f"--{batch}--", ""]
    return f"multipart/mixed; boundary={batch}", CRLF.join(lines).encode("utf-8")


def _part(operation: BatchOperation, *, content_id: int | None) -> list[str]:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"{operation.method} {operation.url} HTTP/1.1"]
    headers = dict(operation.headers)
    if operation.body is not None:
        headers.setdefault("Content-Type", "application/json; type=entry")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append("")
    lines.append(json.dumps(operation.body) if operation.body is not None else "")
    return lines


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def parse_batch_response(content_type: str, body: bytes) -> list[BatchResponse]:
    """Every inner response of a `$batch` response, change-set parts flattened, in order."""
    match = _BOUNDARY.search(content_type)
    if not match:
        raise ValueError("the $batch response has no multipart boundary")
    text = body.decode("utf-8")
    responses: list[BatchResponse] = []
    for part in _split(text, match.group(1)):
        headers, content = _headers_and_rest(part)
        inner_type = headers.get("content-type", "")
        if inner_type.lower().startswith("multipart/mixed"):
            responses += parse_batch_response(inner_type, content.encode("utf-8"))
        else:
            responses.append(_inner_response(content))
    return responses


def _split(text: str, boundary: str) -> list[str]:
    delimiter = f"--{boundary}"
    parts = []
    for chunk in text.split(delimiter)[1:]:
        if chunk.startswith("--"):
            break
        parts.append(chunk.removeprefix("\r\n").removeprefix("\n"))
    return parts


def _headers_and_rest(part: str) -> tuple[dict[str, str], str]:
    normalized = part.replace("\r\n", "\n")
    if normalized.startswith("\n"):
        return {}, normalized[1:]
    head, _, rest = normalized.partition("\n\n")
    headers: dict[str, str] = {}
    for line in head.split("\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers, rest


def _inner_response(content: str) -> BatchResponse:
    status_line, _, rest = content.partition("\n")
    pieces = status_line.split(" ", 2)
    status = int(pieces[1]) if len(pieces) > 1 and pieces[1].isdigit() else 0
    headers, payload = _headers_and_rest(rest)
    payload = payload.strip()
    decoded: Any = None
    if payload:
        try:
            decoded = json.loads(payload)
        except ValueError:
            decoded = payload
    return BatchResponse(status=status, headers=headers, body=decoded)
