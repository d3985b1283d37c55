"""OData literals cannot change a filter's shape; validation quarantines with named reasons."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pytest
from crm_connectors.odata import ODataFilterError, all_of, any_of, check_filter, eq, literal
from crm_sync.records import clean_text, mask_email
from crm_sync.validation import TargetRules, validate_records


def test_literals_escape_quotes_and_format_types() -> None:
    assert literal("x' or 1 eq 1 or 'a") == "'x'' or 1 eq 1 or ''a'"
    assert literal("O'Brien") == "'O''Brien'"
    assert literal(None) == "null"
    assert literal(True) == "true"
    assert literal(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    with pytest.raises(ODataFilterError):
        literal("a\x00b")


def test_injection_attempt_stays_one_comparison() -> None:
    built = eq("emailaddress1", "x' or 1 eq 1 or 'a")
    assert built == "emailaddress1 eq 'x'' or 1 eq 1 or ''a'"
    check_filter(built)
    assert any_of("leadid", ["a", "b"]) == "(leadid eq 'a' or leadid eq 'b')"
    assert all_of("a eq 1", None, "b eq 2") == "(a eq 1) and (b eq 2)"


@pytest.mark.parametrize(
    "bad", ["firstname eq", "eq 'x'", "(a eq 1", "a eq 1 b eq 2", "a equals 1", "contains(a)"]
)
def test_bad_filters_are_rejected(bad: str) -> None:
    with pytest.raises(ODataFilterError):
        check_filter(bad)


@pytest.mark.parametrize(
    "good",
    [
        "Microsoft.Dynamics.CRM.LastXDays(PropertyName='modifiedon',PropertyValue=7)",
        "Microsoft.Dynamics.CRM.Today(PropertyName='createdon')",
        "Microsoft.Dynamics.CRM.OnOrAfter(PropertyName='createdon',PropertyValue='2026-01-01')",
        "Microsoft.Dynamics.CRM.In(PropertyName='lastname',PropertyValues=['Lee','O''Brien'])",
        'Microsoft.Dynamics.CRM.Between(PropertyName=\'numberofemployees\',PropertyValues=["5","2000"])',
        "statecode eq 0 and not Microsoft.Dynamics.CRM.LastXDays(PropertyName='createdon',"
        "PropertyValue=30) or (companyname ne 'x')",
    ],
)
def test_dataverse_query_functions_are_accepted(good: str) -> None:
    assert check_filter(good) == good


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("Microsoft.Dynamics.CRM.LastXDays(PropertyValue=7)", "PropertyName is required"),
        ("Microsoft.Dynamics.CRM.LastXDays(PropertyName=modifiedon)", "quoted column name"),
        ("Microsoft.Dynamics.CRM.LastXDays(PropertyName='ModifiedOn')", "logical name"),
        ("Microsoft.Dynamics.CRM.LastXDays(PropertyName='x',Other=1)", "expected PropertyName"),
        ("Microsoft.Dynamics.CRM.LastXDays(PropertyName='x',PropertyValue=7", "end of filter"),
        ("Microsoft.Dynamics.CRM.In(PropertyName='x',PropertyValues=[])", "literal value"),
        ("Microsoft.Dynamics.CRM.In(PropertyName='x',PropertyValue=(1))", "literal value"),
        ("Microsoft.Dynamics.CRM.A.B(PropertyName='x')", "query function name"),
        ("Microsoft.Dynamics.CRM.Today(PropertyName='x') eq true", "after a complete"),
        ('lastname eq "Lee"', "expected a value"),
        ("lastname eq ['Lee']", "expected a value"),
    ],
)
def test_malformed_query_functions_are_refused(bad: str, message: str) -> None:
    with pytest.raises(ODataFilterError, match=message):
        check_filter(bad)


def test_column_names_are_checked() -> None:
    with pytest.raises(ODataFilterError):
        eq("name eq 'x' or true", "y")


def test_clean_and_mask() -> None:
    assert clean_text("  Ann\x00\tLee \n") == "Ann Lee"
    assert clean_text("   ") is None
    assert mask_email("ann.lee@example.com") == "a***@e***.com"
    assert "ann" not in mask_email("ann@ann.org")


RULES = TargetRules(
    name="lead",
    email_column="emailaddress1",
    required=("lastname",),
    max_length={"firstname": 5, "emailaddress1": 100},
)


def test_validation_reports_each_failing_record_with_reasons() -> None:
    frame = pd.DataFrame(
        {
            "record_key": ["ok", "bad-email", "no-last", "long", "dup1", "dup2"],
            "emailaddress1": ["a@x.io", "not-an-email", "c@x.io", "d@x.io", "e@x.io", "e@x.io"],
            "lastname": ["A", "B", None, "D", "E", "F"],
            "firstname": ["Ann", "Bo", "Cy", "Dorothea", None, None],
        }
    )
    outcome = validate_records(frame, RULES)
    codes = {key: {code for code, _ in items} for key, items in outcome.failures.items()}
    assert codes == {
        "bad-email": {"invalid_email"},
        "no-last": {"missing_required"},
        "long": {"too_long"},
        "dup1": {"duplicate_email_in_batch"},
        "dup2": {"duplicate_email_in_batch"},
    }
    assert "8 characters" in outcome.failures["long"][0][1]
    assert "d@x.io" not in str(outcome.failures)


def test_validation_keeps_great_expectations_registration_lines_out_of_the_task_log() -> None:
    """Importing GX logs ~200 'Skipping registering function' lines at INFO; the validate task's
    log must hold our summary, not those (checked in a fresh process: GX imports once)."""
    import subprocess
    import sys
    from pathlib import Path

    probe = (
        "import io, logging\n"
        "stream = io.StringIO()\n"
        "logging.basicConfig(stream=stream, level=logging.INFO, force=True)\n"
        "import pandas as pd\n"
        "from crm_sync.validation import TargetRules, validate_records\n"
        "frame = pd.DataFrame({'record_key': ['a', 'b'], 'emailaddress1': ['x@example.com', 'x']})\n"
        "out = validate_records(frame, TargetRules(name='t', email_column='emailaddress1'))\n"
        "assert sorted(out.failures) == ['b'], out.failures\n"
        "print(stream.getvalue().count('Skipping registering'))\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, check=True
    )
    assert result.stdout.strip() == "0"
