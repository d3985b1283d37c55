"""Record validation with Great Expectations: suites built from the mapping and target metadata."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from crm_sync.records import Reason

if TYPE_CHECKING:
    import pandas as pd

# A practical address check (RFC 5322 allows more, neither CRM accepts it): one @, no spaces or
# angle brackets, a dotted domain whose TLD has two letters or more.
EMAIL_PATTERN = r"^[^@\s<>()\[\],;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}$"

# ActiveCampaign's text fields accept 255 characters (email, names, phone, custom text fields).
AC_MAX_LENGTH = 255
# Dataverse counts MaxLength in UTF-16 code units, as .NET strings do: a character outside the
# Basic Multilingual Plane (an emoji, many CJK extension ideographs) counts two.
UTF16 = "UTF-16 code units"
CHARACTERS = "characters"
_UTF16_SUFFIX = " (UTF-16 length)"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetRules:
    """What the target accepts, for one entity: the inputs of the expectation suite."""

    name: str
    email_column: str | None  # None: the records have no email (accounts, deals)
    required: tuple[str, ...] = ()
    max_length: dict[str, int] = field(default_factory=dict)
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    length_unit: str = CHARACTERS  # how `max_length` counts: CHARACTERS or UTF16


def utf16_length(value: Any) -> int | None:
    """The length of `value`'s text in UTF-16 code units (None for None; a frame's missing
    values are skipped by the caller)."""
    if value is None:
        return None
    return len(str(value).encode("utf-16-le")) // 2


@dataclass
class ValidationOutcome:
    """Which records passed, and for each failed one its reasons."""

    failures: dict[str, list[tuple[str, str]]]  # record_key -> [(reason_code, message)]
    expectations: int

    @property
    def failed_keys(self) -> set[str]:
        """Record keys that failed at least one expectation."""
        return set(self.failures)


def _suite(rules: TargetRules, columns: set[str]) -> Any:
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=f"crm_sync_{rules.name}")
    email = rules.email_column
    if email is not None:
        suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column=email))
        suite.add_expectation(
            gx.expectations.ExpectColumnValuesToMatchRegex(column=email, regex=EMAIL_PATTERN)
        )
        suite.add_expectation(gx.expectations.ExpectColumnValuesToBeUnique(column=email))
    for column in rules.required:
        if column in columns and column != email:
            suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column=column))
    for column, limit in sorted(rules.max_length.items()):
        if rules.length_unit == UTF16 and column + _UTF16_SUFFIX in columns:
            suite.add_expectation(
                gx.expectations.ExpectColumnValuesToBeBetween(
                    column=column + _UTF16_SUFFIX, max_value=limit
                )
            )
        elif column in columns:
            suite.add_expectation(
                gx.expectations.ExpectColumnValueLengthsToBeBetween(column=column, max_value=limit)
            )
    for column, allowed in sorted(rules.options.items()):
        if column in columns:
            suite.add_expectation(
                gx.expectations.ExpectColumnValuesToBeInSet(column=column, value_set=list(allowed))
            )
    return suite


DUPLICATE_IN_BATCH = (
    Reason.DUPLICATE_EMAIL_IN_BATCH,
    "another record in this batch has the same email",
)


def _reason(expectation: str, column: str, rules: TargetRules, value: Any) -> tuple[str, str]:
    if column == rules.email_column and expectation.endswith("to_be_unique"):
        return DUPLICATE_IN_BATCH
    if column == rules.email_column and "lengths" not in expectation:
        what = "missing" if value is None or value != value else "not a valid address"
        return Reason.INVALID_EMAIL, f"email is {what} ({expectation})"
    if expectation.endswith("to_not_be_null"):
        return Reason.MISSING_REQUIRED, f"'{column}' is required by {rules.name} ({expectation})"
    if column.endswith(_UTF16_SUFFIX):
        column = column.removesuffix(_UTF16_SUFFIX)
        units, characters = utf16_length(value) or 0, len(str(value or ""))
        size = (
            f"{characters} characters"
            if units == characters
            else f"{units} {UTF16} ({characters} characters: an emoji and some other characters "
            "count 2, as Dataverse counts MaxLength)"
        )
        limit = rules.max_length.get(column)
        return (
            Reason.TOO_LONG,
            f"'{column}' has {size}; {rules.name} allows {limit} ({expectation})",
        )
    if "lengths" in expectation:
        length = len(str(value)) if value is not None else 0
        limit = rules.max_length.get(column)
        return (
            Reason.TOO_LONG,
            f"'{column}' has {length} characters; {rules.name} allows {limit} ({expectation})",
        )
    if expectation.endswith("to_be_in_set"):
        return (
            Reason.INVALID_OPTION,
            f"'{column}' is not one of the allowed options ({expectation})",
        )
    return Reason.TARGET_REJECTED, f"'{column}' failed {expectation}"


def validate_records(frame: pd.DataFrame, rules: TargetRules) -> ValidationOutcome:
    """Run the suite for `rules` over `frame` (one row per record, `record_key` + target columns).

    Nulls pass every expectation except the not-null ones, as Great Expectations defines them.
    """
    if frame.empty:
        return ValidationOutcome(failures={}, expectations=0)
    # GX logs every registration (hundreds of "Skipping registering function ..." lines while it
    # is imported) and metric at INFO: keep the task log to our own summary.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    import pandas as pd

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}  # type: ignore[assignment]  # GX accepts the dict it documents
    definition = (
        context.data_sources.add_pandas(name="crm_sync")
        .add_dataframe_asset(name=rules.name)
        .add_batch_definition_whole_dataframe("run")
    )
    # Failures come back as row positions, mapped to record keys here: GX reports named index
    # columns row by row, and fingerprints every column of each batch it builds (so: one batch,
    # without the key column).
    data = frame.drop(columns="record_key").reset_index(drop=True)
    if rules.length_unit == UTF16:
        for column in rules.max_length:
            if column in data:
                lengths = data[column].map(utf16_length, na_action="ignore")
                data[column + _UTF16_SUFFIX] = pd.array(lengths, dtype="Int64")
    keys = frame["record_key"].astype(str).tolist()
    suite = context.suites.add(_suite(rules, set(data.columns)))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"crm_sync_{rules.name}", data=definition, suite=suite)
    )
    result = validation.run(
        batch_parameters={"dataframe": data},
        result_format={"result_format": "COMPLETE", "return_unexpected_index_query": False},
    )
    failures: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for item in result.results:
        config = item.expectation_config
        assert config is not None  # every result of a suite run names its expectation
        column = config.kwargs.get("column", "")
        if item.exception_info and item.exception_info.get("raised_exception"):
            raise RuntimeError(
                f"validation could not run {config.type} on '{column}': "
                f"{item.exception_info.get('exception_message')}"
            )
        # A UTF-16 length column reports on the text it measured.
        values = data.get(column.removesuffix(_UTF16_SUFFIX))
        for position in item.result.get("unexpected_index_list") or []:
            value = values.iat[position] if values is not None else None
            reason = _reason(config.type, column, rules, None if pd.isna(value) else value)
            if reason not in failures[keys[position]]:
                failures[keys[position]].append(reason)
    return ValidationOutcome(failures=dict(failures), expectations=len(result.results))


def validate_parts(
    frames: Iterable[pd.DataFrame], rules: TargetRules
) -> dict[str, list[tuple[str, str]]]:
    """`validate_records` over a run's records a part at a time (each part a frame as it
    takes), with the email's uniqueness checked across every part: the failures of the run as
    one frame would have them, while one part's values are held (and every record's key and
    email). Returns them by record key."""
    import pandas as pd

    failures: dict[str, list[tuple[str, str]]] = defaultdict(list)
    emails = []
    for frame in frames:
        for key, reasons in validate_records(frame, rules).failures.items():
            failures[key] += reasons
        if rules.email_column in frame:
            emails.append(frame[["record_key", rules.email_column]])
    if len(emails) > 1:
        together = pd.concat(emails, ignore_index=True)
        email = together[rules.email_column]
        for key in together.loc[email.notna() & email.duplicated(keep=False), "record_key"]:
            if DUPLICATE_IN_BATCH not in failures[str(key)]:
                failures[str(key)].append(DUPLICATE_IN_BATCH)
    return dict(failures)
