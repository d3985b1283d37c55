"""OData query options: a `$filter` parser compiled to parameterised SQL, `$select`, `$orderby`, keys."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sandbox.dataverse.errors import DataverseError, bad_request, unknown_property
from sandbox.dataverse.schema import NS, Column, Entity
from sandbox.dataverse.store import odata_like

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
    |(?P<string>'(?:[^']|'')*')
    |(?P<jsonstring>"(?:[^"\\]|\\.)*")
    |(?P<unterminated>')
    |(?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,7})?)?(?:Z|[+-]\d{2}:\d{2}))
    |(?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})
    |(?P<date>\d{4}-\d{2}-\d{2})
    |(?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[mMdDfFlL]?)
    |(?P<alias>@[A-Za-z_]\w*)
    |(?P<ident>[A-Za-z_][\w.]*)
    |(?P<punct>[(),\[\]=])
    """,
    re.VERBOSE,
)
COMPARISONS = {"eq": "=", "ne": "<>", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
STRING_FUNCTIONS = {"contains": "%{}%", "startswith": "{}%", "endswith": "%{}"}
_NUMERIC = {"Edm.Int32", "Edm.Int64", "Edm.Decimal", "Edm.Double"}
_TEMPORAL = {"Edm.DateTimeOffset", "Edm.Date"}
_OP_NAMES = {
    "eq": "Equal", "ne": "NotEqual", "gt": "GreaterThan", "ge": "GreaterThanOrEqual",
    "lt": "LessThan", "le": "LessThanOrEqual",
}  # fmt: skip


@dataclass(frozen=True)
class Token:
    """One lexical token of a filter (kind, text, position)."""

    kind: str
    text: str
    pos: int


@dataclass(frozen=True)
class Prop:
    """A column reference."""

    name: str
    edm: str


@dataclass(frozen=True)
class Lit:
    """A literal with its OData type (`None` value for `null`)."""

    edm: str
    value: Any


@dataclass(frozen=True)
class Compare:
    """`left <op> right`."""

    op: str
    left: Prop | Lit
    right: Prop | Lit


@dataclass(frozen=True)
class Logical:
    """`and` / `or` of two expressions."""

    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Not:
    """`not expr`."""

    expr: Node


@dataclass(frozen=True)
class Like:
    """contains/startswith/endswith: a case-insensitive LIKE pattern on a string column."""

    prop: Prop
    pattern: str


@dataclass(frozen=True)
class Member:
    """`Microsoft.Dynamics.CRM.In` / `NotIn` and friends, reduced to set or range tests."""

    prop: Prop
    values: tuple[Any, ...]
    negate: bool
    kind: str  # "in" or "between"


@dataclass(frozen=True)
class BoolProp:
    """A Boolean column used alone as a condition."""

    prop: Prop


Node = Compare | Logical | Not | Like | Member | BoolProp | Lit


@functools.lru_cache(maxsize=4096)
def utc_text(epoch: float) -> str:
    """An epoch as Dataverse writes DateTimes: ISO-8601 UTC, whole seconds, `Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@functools.lru_cache(maxsize=4096)
def utc_date(epoch: float) -> str:
    """A DateOnly value (stored as midnight UTC) as the Web API writes an Edm.Date: `2024-05-31`."""
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def parse_datetime(text: str) -> float:
    """An OData DateTimeOffset (or date-only) literal as epoch seconds."""
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def _literal(token: Token, source: str) -> Lit:
    text = token.text
    if token.kind == "string":
        return Lit("Edm.String", text[1:-1].replace("''", "'"))
    if token.kind in ("datetime", "date"):
        try:
            return Lit("Edm.DateTimeOffset", parse_datetime(text))
        except ValueError:
            raise bad_request(
                f"The DateTimeOffset text '{text}' should be in format 'yyyy-mm-ddThh:mm:ss('.'s+)?"
                "(zzzzzz)?' and each field value is within valid range."
            ) from None
    if token.kind == "guid":
        return Lit("Edm.Guid", text.lower())
    if token.kind == "number":
        body = text.rstrip("mMdDfFlL")
        if re.fullmatch(r"-?\d+", body):
            number = int(body)
            return Lit("Edm.Int32" if -(2**31) <= number < 2**31 else "Edm.Int64", number)
        return Lit("Edm.Decimal", float(body))
    if token.kind == "ident" and text in ("true", "false"):
        return Lit("Edm.Boolean", text == "true")
    if token.kind == "ident" and text == "null":
        return Lit("null", None)
    raise _syntax(token.pos, source)


def _syntax(pos: int, source: str) -> DataverseError:
    return bad_request(f"Syntax error at position {pos} in '{source}'.")


def tokenize(source: str) -> list[Token]:
    """Split a filter into tokens; a quote that is never closed is an error."""
    tokens: list[Token] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            raise _syntax(pos, source)
        kind = match.lastgroup or ""
        if kind == "unterminated":
            raise bad_request(
                f"There is an unterminated string literal at position {pos} in '{source}'."
            )
        if kind != "ws":
            tokens.append(Token(kind, match.group(), pos))
        pos = match.end()
    return tokens


class FilterParser:
    """Recursive-descent parser for the OData 4.0 `$filter` subset Dataverse supports."""

    def __init__(
        self,
        source: str,
        resolve: Callable[[str], str | None],
        type_name: str,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.source = source
        self.tokens = tokenize(source)
        self.i = 0
        self.resolve = resolve
        self.type_name = type_name
        self.aliases = aliases or {}

    def parse(self) -> Node:
        """The whole filter as an expression tree."""
        if not self.tokens:
            raise _syntax(0, self.source)
        node = self._or()
        if self.i < len(self.tokens):
            raise _syntax(self.tokens[self.i].pos, self.source)
        return self._boolean(node)

    def _peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self, text: str | None = None) -> Token:
        token = self._peek()
        if token is None:
            raise _syntax(len(self.source), self.source)
        if text is not None and token.text != text:
            raise _syntax(token.pos, self.source)
        self.i += 1
        return token

    def _keyword(self, word: str) -> bool:
        token = self._peek()
        if token is not None and token.kind == "ident" and token.text == word:
            self.i += 1
            return True
        return False

    def _boolean(self, node: Any) -> Node:
        if isinstance(node, Prop):
            if node.edm != "Edm.Boolean":
                raise bad_request("The $filter expression must evaluate to a single boolean value.")
            return BoolProp(node)
        if isinstance(node, Lit) and node.edm != "Edm.Boolean":
            raise bad_request("The $filter expression must evaluate to a single boolean value.")
        return node

    def _or(self) -> Any:
        node = self._and()
        while self._keyword("or"):
            node = Logical("or", self._boolean(node), self._boolean(self._and()))
        return node

    def _and(self) -> Any:
        node = self._not()
        while self._keyword("and"):
            node = Logical("and", self._boolean(node), self._boolean(self._not()))
        return node

    def _not(self) -> Any:
        if self._keyword("not"):
            return Not(self._boolean(self._not()))
        return self._comparison()

    def _comparison(self) -> Any:
        left = self._operand()
        token = self._peek()
        if token is not None and token.kind == "ident" and token.text in COMPARISONS:
            self.i += 1
            right = self._operand()
            if not isinstance(left, Prop | Lit) or not isinstance(right, Prop | Lit):
                raise _syntax(token.pos, self.source)
            self._check_types(token.text, left, right)
            return Compare(token.text, left, right)
        return left

    def _check_types(self, op: str, left: Prop | Lit, right: Prop | Lit) -> None:
        a, b = left.edm, right.edm
        if "null" in (a, b) or a == b:
            return
        if {a, b} <= _NUMERIC or {a, b} <= _TEMPORAL:
            return
        raise bad_request(
            "A binary operator with incompatible types was detected. Found operand types "
            f"'{a}' and '{b}' for operator kind '{_OP_NAMES[op]}'."
        )

    def _operand(self) -> Any:
        token = self._take()
        if token.text == "(" and token.kind == "punct":
            node = self._or()
            self._take(")")
            return node
        if token.kind == "alias":
            return self._alias(token)
        if token.kind == "ident" and token.text not in ("true", "false", "null"):
            following = self._peek()
            if following is not None and following.text == "(":
                return self._function(token)
            return self._prop(token.text)
        return _literal(token, self.source)

    def _alias(self, token: Token) -> Lit:
        text = self.aliases.get(token.text)
        if text is None:
            raise bad_request(f"The parameter alias '{token.text}' has no value.")
        tokens = tokenize(text)
        if len(tokens) != 1:
            raise _syntax(0, text)
        return _literal(tokens[0], text)

    def _prop(self, name: str) -> Prop:
        edm = self.resolve(name)
        if edm is None:
            raise unknown_property(name, self.type_name)
        return Prop(name, edm)

    def _function(self, name: Token) -> Node:
        self._take("(")
        if name.text in STRING_FUNCTIONS:
            target = self._operand()
            self._take(",")
            needle = self._operand()
            self._take(")")
            if not isinstance(target, Prop) or target.edm != "Edm.String":
                raise bad_request(f"The first argument of '{name.text}' must be a string column.")
            if not isinstance(needle, Lit) or needle.edm != "Edm.String":
                raise bad_request(f"The second argument of '{name.text}' must be a string literal.")
            return Like(target, STRING_FUNCTIONS[name.text].format(needle.value))
        if name.text.startswith(f"{NS}."):
            return self._crm_function(name)
        raise bad_request(f"An unknown function with name '{name.text}' was found.")

    def _crm_function(self, name: Token) -> Node:
        params: dict[str, Any] = {}
        while True:
            key = self._take()
            self._take("=")
            params[key.text] = self._param_value()
            if self._take().text == ")":
                break
        function = name.text[len(NS) + 1 :]
        prop_name = params.get("PropertyName")
        if not isinstance(prop_name, str):
            raise bad_request(f"The function '{name.text}' needs a PropertyName parameter.")
        prop = self._prop(prop_name)
        values = params.get("PropertyValues", [])
        if function in ("In", "NotIn"):
            return Member(prop, self._typed(prop, values), function == "NotIn", "in")
        if function in ("Between", "NotBetween"):
            if len(values) != 2:
                raise bad_request(f"The function '{name.text}' needs exactly two PropertyValues.")
            return Member(prop, self._typed(prop, values), function == "NotBetween", "between")
        if function in ("OnOrAfter", "OnOrBefore") and prop.edm in _TEMPORAL:
            start = _day_start(params.get("PropertyValue"))
            op = "ge" if function == "OnOrAfter" else "lt"
            bound = start if function == "OnOrAfter" else start + 86400
            return Compare(op, prop, Lit("Edm.DateTimeOffset", bound))
        if function in ("LastXHours", "LastXDays") and prop.edm in _TEMPORAL:
            amount = int(params.get("PropertyValue", 0))
            span = 3600 if function == "LastXHours" else 86400
            return Compare("ge", prop, Lit("Edm.DateTimeOffset", time.time() - amount * span))
        raise bad_request(f"The query function '{name.text}' is not supported by the sandbox.")

    def _param_value(self) -> Any:
        token = self._take()
        if token.text == "[":
            items: list[Any] = []
            while True:
                item = self._take()
                if item.text == "]" and not items:
                    break
                # A collection literal: Microsoft's examples write its strings in JSON form.
                items.append(
                    json.loads(item.text)
                    if item.kind == "jsonstring"
                    else _literal(item, self.source).value
                )
                if self._take().text == "]":
                    break
            return items
        if token.kind == "alias":
            text = self.aliases.get(token.text, "")
            return _parse_value_text(text)
        return _literal(token, self.source).value

    def _typed(self, prop: Prop, values: list[Any]) -> tuple[Any, ...]:
        out: list[Any] = []
        for value in values:
            try:
                if prop.edm in _NUMERIC:
                    out.append(int(value))
                elif prop.edm in _TEMPORAL:
                    out.append(parse_datetime(value) if isinstance(value, str) else value)
                elif prop.edm == "Edm.Boolean":
                    out.append(str(value).lower() == "true" if isinstance(value, str) else value)
                elif prop.edm == "Edm.Guid":
                    out.append(str(value).lower())
                else:
                    out.append(str(value))
            except (TypeError, ValueError):
                raise bad_request(
                    f"The value '{value}' is not valid for the property '{prop.name}'."
                ) from None
        return tuple(out)


def _parse_value_text(text: str) -> Any:
    tokens = tokenize(text)
    if tokens and tokens[0].text == "[":
        return [
            json.loads(t.text) if t.kind == "jsonstring" else _literal(t, text).value
            for t in tokens[1:]
            if t.kind != "punct"
        ]
    if len(tokens) != 1:
        raise _syntax(0, text)
    return _literal(tokens[0], text).value


def _day_start(value: Any) -> float:
    if not isinstance(value, str):
        raise bad_request("The date functions need a PropertyValue such as '2024-01-31'.")
    try:
        day = dt.date.fromisoformat(value[:10])
    except ValueError:
        raise bad_request(f"The value '{value}' is not a valid date.") from None
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


def entity_resolver(entity: Entity) -> Callable[[str], str | None]:
    """Resolves JSON property names of a table's columns to their OData types."""

    def resolve(name: str) -> str | None:
        column = entity.by_json_name(name)
        return column.edm_type if column is not None else None

    return resolve


def parse_filter(source: str, entity: Entity, aliases: Mapping[str, str] | None = None) -> Node:
    """Parse a `$filter` against a table's columns."""
    return FilterParser(source, entity_resolver(entity), entity.type_name, aliases).parse()


class SqlCompiler:
    """Turns a filter tree into a SQL condition; every value travels as a bound parameter."""

    def __init__(self, entity: Entity) -> None:
        self.entity = entity
        self.params: list[Any] = []

    def column(self, prop: Prop) -> Column:
        """The table column behind a property."""
        column = self.entity.by_json_name(prop.name)
        if column is None:
            raise unknown_property(prop.name, self.entity.type_name)
        return column

    def _operand(self, node: Prop | Lit, string: bool) -> str:
        if isinstance(node, Prop):
            name = self.column(node).name
            return f"ci({name})" if string else name
        value = node.value
        if isinstance(value, bool):
            value = int(value)
        elif string and isinstance(value, str):
            value = value.casefold()
        self.params.append(value)
        return "?"

    def compile(self, node: Node) -> str:
        """SQL text for the condition (never NULL: unknown compares as false)."""
        if isinstance(node, Logical):
            # Flat `a OR b OR c`: long chains (e.g. hundreds of emails) would otherwise nest
            # deeper than SQLite's parser and Python's recursion allow.
            terms = [self.compile(term) for term in _chain(node)]
            return "(" + f" {node.op.upper()} ".join(terms) + ")"
        if isinstance(node, Not):
            return f"(NOT {self.compile(node.expr)})"
        if isinstance(node, BoolProp):
            return f"({self.column(node.prop).name} = 1)"
        if isinstance(node, Lit):
            return "1" if node.value else "0"
        if isinstance(node, Like):
            self.params.append(node.pattern)
            name = self.column(node.prop).name
            if node.pattern.isascii() and "[" not in node.pattern:
                # SQLite's own LIKE (case-insensitive for ASCII, same wildcards) is much faster.
                return f"({name} LIKE ?)"
            return f"odata_like({name}, ?)"
        if isinstance(node, Member):
            return self._member(node)
        return self._compare(node)

    def _member(self, node: Member) -> str:
        string = node.prop.edm == "Edm.String"
        target = self._operand(node.prop, string)
        name = self.column(node.prop).name
        values = [v.casefold() if string and isinstance(v, str) else v for v in node.values]
        if node.kind == "in":
            self.params.extend(values)
            test = f"{target} IN ({', '.join('?' for _ in values)})"
        else:
            self.params.extend(values)
            test = f"{target} BETWEEN ? AND ?"
        if node.negate:
            return f"({name} IS NULL OR NOT ({test}))"
        return f"({name} IS NOT NULL AND {test})"

    def _compare(self, node: Compare) -> str:
        left, right, op = node.left, node.right, node.op
        left_null = isinstance(left, Lit) and left.value is None
        right_null = isinstance(right, Lit) and right.value is None
        if left_null or right_null:
            if left_null and right_null:
                return "1" if op in ("eq", "ge", "le") else "0"
            other = right if left_null else left
            if op not in ("eq", "ne"):
                return "0"
            sql = self._operand(other, False)
            return f"({sql} IS {'NOT ' if op == 'ne' else ''}NULL)"
        string = "Edm.String" in (left.edm, right.edm)
        if isinstance(left, Lit) and isinstance(right, Prop):
            left, right, op = right, left, _MIRROR.get(op, op)
        a = self._operand(left, string)
        b = self._operand(right, string)
        if isinstance(left, Prop) and isinstance(right, Prop):
            if op in ("eq", "ne"):
                return f"({a} IS {'NOT ' if op == 'ne' else ''}{b})"
            return f"COALESCE({a} {COMPARISONS[op]} {b}, 0)"
        if isinstance(left, Lit):
            return f"COALESCE({a} {COMPARISONS[op]} {b}, 0)"
        # Written as plain AND/OR terms (not COALESCE) so SQLite can use the column's index.
        name = self.column(left).name
        if op == "ne":
            return f"({name} IS NULL OR {a} <> {b})"
        return f"({a} {COMPARISONS[op]} {b} AND {name} IS NOT NULL)"


_MIRROR = {"gt": "lt", "lt": "gt", "ge": "le", "le": "ge"}


def _chain(node: Logical) -> list[Node]:
    """The operands of a run of the same logical operator, left to right."""
    terms: list[Node] = []
    stack: list[Node] = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, Logical) and current.op == node.op:
            stack += [current.right, current.left]
        else:
            terms.append(current)
    return terms


def evaluate(node: Node, row: Mapping[str, Any]) -> bool:
    """Evaluate a filter against a plain mapping (used for metadata collections)."""
    if isinstance(node, Logical):
        results = (evaluate(term, row) for term in _chain(node))
        return all(results) if node.op == "and" else any(results)
    if isinstance(node, Not):
        return not evaluate(node.expr, row)
    if isinstance(node, BoolProp):
        return bool(row.get(node.prop.name))
    if isinstance(node, Lit):
        return bool(node.value)
    if isinstance(node, Like):
        return bool(odata_like(row.get(node.prop.name), node.pattern))
    if isinstance(node, Member):
        value = row.get(node.prop.name)
        if value is None:
            return node.negate
        folded = value.casefold() if isinstance(value, str) else value
        values = [v.casefold() if isinstance(v, str) else v for v in node.values]
        inside = folded in values if node.kind == "in" else values[0] <= folded <= values[1]
        return inside != node.negate
    a = _value(node.left, row)
    b = _value(node.right, row)
    if node.op == "eq":
        return a == b
    if node.op == "ne":
        return a != b
    if a is None or b is None:
        return False
    return bool({"gt": a > b, "ge": a >= b, "lt": a < b, "le": a <= b}[node.op])


def _value(node: Prop | Lit, row: Mapping[str, Any]) -> Any:
    value = row.get(node.name) if isinstance(node, Prop) else node.value
    return value.casefold() if isinstance(value, str) else value


@dataclass(frozen=True)
class OrderKey:
    """One `$orderby` item."""

    name: str
    descending: bool


def parse_orderby(
    source: str, resolve: Callable[[str], str | None], type_name: str
) -> list[OrderKey]:
    """`$orderby=a desc,b` as a list of keys; unknown columns are a 400."""
    keys: list[OrderKey] = []
    for item in source.split(","):
        parts = item.split()
        if not parts or len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("asc", "desc")):
            raise bad_request(f"Syntax error in $orderby '{source}'.")
        if resolve(parts[0]) is None:
            raise unknown_property(parts[0], type_name)
        keys.append(OrderKey(parts[0], len(parts) == 2 and parts[1] == "desc"))
    return keys


def parse_select(source: str, resolve: Callable[[str], str | None], type_name: str) -> list[str]:
    """`$select=a,b` as a list of names; unknown columns are a 400."""
    names: list[str] = []
    for raw in source.split(","):
        name = raw.strip()
        if resolve(name) is None:
            raise unknown_property(name, type_name)
        if name not in names:
            names.append(name)
    return names


_KEY_PAIR = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*('(?:[^']|'')*'|[^,]+?)\s*(?:,|$)")


def parse_key(text: str) -> str | dict[str, Any]:
    """The inside of `leads(...)`: a bare GUID, or `name=value` pairs (alternate keys)."""
    stripped = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", stripped):
        return stripped.lower()
    pairs: dict[str, Any] = {}
    pos = 0
    while pos < len(stripped):
        match = _KEY_PAIR.match(stripped, pos)
        if match is None:
            raise bad_request(f"Bad Request - Error in query syntax: '{text}'.")
        value_text = match.group(2)
        tokens = tokenize(value_text)
        if len(tokens) != 1:
            raise bad_request(f"Bad Request - Error in query syntax: '{text}'.")
        pairs[match.group(1)] = _literal(tokens[0], value_text).value
        pos = match.end()
    if not pairs:
        raise bad_request(f"Bad Request - Error in query syntax: '{text}'.")
    return pairs
