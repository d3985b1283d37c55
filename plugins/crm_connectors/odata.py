"""OData `$filter` building with escaped literals, and a syntax check for user-written filters."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^']|'')*')
      | (?P<jsonstring>"(?:[^"\\]|\\.)*")
      | (?P<datetime>\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))?)
      | (?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})
      | (?P<number>-?\d+(?:\.\d+)?)
      | (?P<name>[A-Za-z_][A-Za-z0-9_./]*)
      | (?P<punct>[(),=\[\]])
    )""",
    re.VERBOSE,
)
_COMPARISONS = {"eq", "ne", "gt", "ge", "lt", "le"}
_FUNCTIONS = {"contains", "startswith", "endswith"}
# Dataverse query functions: Microsoft.Dynamics.CRM.<Name>(PropertyName='col'[,PropertyValue=v |
# ,PropertyValues=[v,...]]), e.g. LastXDays, OnOrAfter, In, Between, Today. The values of
# PropertyValues may be JSON strings ("5"), as Microsoft's examples write them.
QUERY_FUNCTION_PREFIX = "Microsoft.Dynamics.CRM."
_QUERY_FUNCTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_LITERALS = {"string", "datetime", "guid", "number"}
_KEYWORDS = {"and", "or", "not", "true", "false", "null"} | _COMPARISONS


class ODataFilterError(ValueError):
    """A `$filter` expression is not valid OData."""


def literal(value: object) -> str:
    """An OData literal for `value`; quotes in strings are doubled, so a value cannot escape."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, uuid.UUID):
        return str(value)
    text = str(value)
    if "\x00" in text:
        raise ODataFilterError("a NUL byte cannot be sent in an OData literal")
    return "'" + text.replace("'", "''") + "'"


def column(name: str) -> str:
    """A column name, checked so that it cannot carry an expression."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ODataFilterError(f"'{name}' is not a column logical name")
    return name


def eq(name: str, value: object) -> str:
    """`name eq <literal>`."""
    return f"{column(name)} eq {literal(value)}"


def compare(name: str, operator: str, value: object) -> str:
    """`name <operator> <literal>` for one of eq, ne, gt, ge, lt, le."""
    if operator not in _COMPARISONS:
        raise ODataFilterError(f"'{operator}' is not a comparison operator")
    return f"{column(name)} {operator} {literal(value)}"


def any_of(name: str, values: Iterable[object]) -> str:
    """`(name eq v1 or name eq v2 ...)`."""
    parts = [eq(name, value) for value in values]
    if not parts:
        raise ODataFilterError("any_of needs at least one value")
    return "(" + " or ".join(parts) + ")"


def all_of(*parts: str | None) -> str | None:
    """The conjunction of the non-empty parts, each in parentheses."""
    present = [p for p in parts if p]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return " and ".join(f"({p})" for p in present)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise ODataFilterError(
                f"unexpected text at position {position}: {text[position:][:20]!r}"
            )
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class _Parser:
    """Recursive-descent check of the `$filter` grammar the sync supports."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.position = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (expected is not None and token[1].lower() != expected):
            got = token[1] if token else "end of filter"
            raise ODataFilterError(f"expected {expected or 'a value'}, got {got!r}")
        self.position += 1
        return token

    def parse(self) -> None:
        self.disjunction()
        extra = self.peek()
        if extra is not None:
            raise ODataFilterError(f"unexpected {extra[1]!r} after a complete expression")

    def disjunction(self) -> None:
        self.conjunction()
        while (token := self.peek()) and token[1].lower() == "or":
            self.take()
            self.conjunction()

    def conjunction(self) -> None:
        self.negation()
        while (token := self.peek()) and token[1].lower() == "and":
            self.take()
            self.negation()

    def negation(self) -> None:
        token = self.peek()
        if token and token[1].lower() == "not":
            self.take()
            self.negation()
            return
        self.primary()

    def primary(self) -> None:
        token = self.peek()
        if token and token[1] == "(":
            self.take()
            self.disjunction()
            self.take(")")
            return
        if token and token[0] == "name" and token[1].startswith(QUERY_FUNCTION_PREFIX):
            self.query_function()
            return
        if token and token[0] == "name" and token[1].lower() in _FUNCTIONS:
            self.take()
            self.take("(")
            self.operand(column_only=True)
            self.take(",")
            self.operand()
            self.take(")")
            return
        self.operand(column_only=True)
        operator = self.take()
        if operator[1].lower() not in _COMPARISONS:
            raise ODataFilterError(
                f"expected a comparison (eq, ne, gt, ge, lt, le), got {operator[1]!r}"
            )
        self.operand()

    def query_function(self) -> None:
        """`Microsoft.Dynamics.CRM.<Name>(PropertyName='column'[, PropertyValue=<literal>]
        [, PropertyValues=[<literal>, ...]])`: a Dataverse query function, itself a condition."""
        _, name = self.take()
        function = name[len(QUERY_FUNCTION_PREFIX) :]
        if not _QUERY_FUNCTION_NAME.fullmatch(function):
            raise ODataFilterError(f"{name!r} is not a Dataverse query function name")
        self.take("(")
        seen: set[str] = set()
        while True:
            kind, parameter = self.take()
            if kind != "name" or parameter not in (
                "PropertyName",
                "PropertyValue",
                "PropertyValues",
            ):
                raise ODataFilterError(
                    f"{function}: expected PropertyName, PropertyValue or PropertyValues, "
                    f"got {parameter!r}"
                )
            if parameter in seen:
                raise ODataFilterError(f"{function}: {parameter} given twice")
            seen.add(parameter)
            self.take("=")
            if parameter == "PropertyName":
                kind, value = self.take()
                if kind != "string":
                    raise ODataFilterError(
                        f"{function}: PropertyName must be a quoted column name, got {value!r}"
                    )
                column(value[1:-1])
            elif parameter == "PropertyValues":
                self.take("[")
                self.literal(json_string=True)
                while (token := self.peek()) and token[1] == ",":
                    self.take()
                    self.literal(json_string=True)
                self.take("]")
            else:
                self.literal()
            closing = self.take()
            if closing[1] == ")":
                break
            if closing[1] != ",":
                raise ODataFilterError(f"{function}: expected ',' or ')', got {closing[1]!r}")
        if "PropertyName" not in seen:
            raise ODataFilterError(f"{function}: PropertyName is required")

    def literal(self, *, json_string: bool = False) -> None:
        kind, value = self.take()
        if kind == "jsonstring" and json_string:
            return
        if kind not in _LITERALS and value.lower() not in ("true", "false", "null"):
            raise ODataFilterError(f"expected a literal value, got {value!r}")

    def operand(self, *, column_only: bool = False) -> None:
        kind, value = self.take()
        if column_only and (kind != "name" or value.lower() in _KEYWORDS):
            raise ODataFilterError(f"expected a column name, got {value!r}")
        if kind in ("punct", "jsonstring"):
            raise ODataFilterError(f"expected a value, got {value!r}")


def check_filter(text: str) -> str:
    """Check that `text` is a `$filter` the sync can send; raise `ODataFilterError` naming the problem."""
    if text.count("'") % 2:
        raise ODataFilterError("a string literal is not closed (quotes inside must be doubled: '')")
    _Parser(text).parse()
    return text
