"""The bad-input corpus: each record with the outcome the sync must give it, written next to it.

Outcomes: `as-is` (the target holds exactly the input), `normalised` (the target holds the
values in `synced`), `quarantined` (an open quarantine entry with `reason`, nothing in the
target), `not synced` (not eligible for `reason`, nothing in the target, no quarantine entry).
`origin` says where the record is typed in: `ac` (an ActiveCampaign contact, queued by the
automation step as a lead unless `tags` says otherwise) or `lead`/`contact` (a Dynamics row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AS_IS, NORMALISED, QUARANTINED, NOT_SYNCED = "as-is", "normalised", "quarantined", "not synced"


@dataclass(frozen=True)
class Case:
    """One corpus record and its expected outcome."""

    key: str
    origin: str
    what: str
    record: dict[str, Any]
    outcome: str
    reason: str | None = None
    synced: dict[str, Any] = field(default_factory=dict)
    # `lead`, `contact`, `both`, `type-only`, `origin-only`, `none`, `pushed`, `pushed-contact`
    tags: str = "lead"
    # A record that already exists in the target with this email (another spelling).
    existing: dict[str, Any] | None = None

    @property
    def email(self) -> str:
        default = f"{self.key.lower()}@corpus.example.com"
        return (
            self.record.get("email", default)
            if self.origin == "ac"
            else self.record.get("emailaddress1", default)
        )


X = "x"
OVER = {50: "A" * 51, 100: "B" * 101}

CASES: list[Case] = [
    # -- typed in ActiveCampaign, synced to Dynamics 365 --------------------------------------
    Case("A01", "ac", "plain record", {"first": "Ann", "last": "Plain", "phone": "+44 20 7946 0001", "COMPANY": "Acme", "JOB_TITLE": "CTO"}, AS_IS),
    Case("A02", "ac", "mixed-case email", {"email": "Mixed.Case@Corpus.Example.COM", "first": "Max", "last": "Case"}, NORMALISED, synced={"emailaddress1": "mixed.case@corpus.example.com"}),
    Case("A03", "ac", "plus-addressed email", {"email": "plus+tag@corpus.example.com", "first": "Pat", "last": "Plus"}, AS_IS),
    Case("A04", "ac", "apostrophe in email and name", {"email": "o'brien.a04@corpus.example.com", "first": "Siobhán", "last": "O'Brien"}, AS_IS),
    Case("A05", "ac", "quotes in names", {"first": 'Say "Hi"', "last": "D'Arcy"}, AS_IS),
    Case("A06", "ac", "OData-looking value", {"first": "Odata", "last": "x' or 1 eq 1 or 'a"}, AS_IS),
    Case("A07", "ac", "spreadsheet formula", {"first": "Formula", "last": '=HYPERLINK("http://x.io","x")', "JOB_TITLE": "=1+1"}, AS_IS),
    Case("A08", "ac", "HTML and script in names", {"first": "<script>alert(1)</script>", "last": "<b>Bold</b>"}, AS_IS),
    Case("A09", "ac", "emoji", {"first": "Zoë 🎉", "last": "Party 🥳"}, AS_IS),
    Case("A10", "ac", "right-to-left scripts", {"first": "مريم", "last": "כהן"}, AS_IS),
    Case("A11", "ac", "non-Latin scripts", {"first": "王", "last": "Иванов", "JOB_TITLE": "Διευθυντής"}, AS_IS),
    Case("A12", "ac", "non-Latin company", {"first": "Kenji", "last": "Sato", "COMPANY": "株式会社テスト"}, AS_IS),
    Case("A13", "ac", "leading and trailing whitespace", {"first": "  Ann  ", "last": " Space ", "JOB_TITLE": " Lead Dev "}, NORMALISED, synced={"firstname": "Ann", "lastname": "Space", "jobtitle": "Lead Dev"}),
    Case("A14", "ac", "tabs and line breaks", {"first": "Ann\tMarie", "last": "Lee\nSmith"}, NORMALISED, synced={"firstname": "Ann Marie", "lastname": "Lee Smith"}),
    Case("A15", "ac", "control characters", {"first": "Bell\x07e", "last": "Esc\x1bape"}, NORMALISED, synced={"firstname": "Belle", "lastname": "Escape"}),
    Case("A16", "ac", "NUL bytes", {"first": "Nul\x00l", "last": "Byte\x00s"}, NORMALISED, synced={"firstname": "Null", "lastname": "Bytes"}),
    Case("A17", "ac", "missing last name (required in Dynamics)", {"first": "No", "last": None}, QUARANTINED, "missing_required"),
    Case("A18", "ac", "missing first name", {"first": None, "last": "Firstless"}, AS_IS),
    Case("A19", "ac", "first name over MaxLength 50", {"first": OVER[50], "last": "Long"}, QUARANTINED, "too_long"),
    Case("A20", "ac", "last name over MaxLength 50", {"first": "Long", "last": OVER[50]}, QUARANTINED, "too_long"),
    Case("A21", "ac", "phone over MaxLength 50", {"first": "Long", "last": "Phone", "phone": "1" * 51}, QUARANTINED, "too_long"),
    Case("A22", "ac", "job title over MaxLength 100", {"first": "Long", "last": "Job", "JOB_TITLE": OVER[100]}, QUARANTINED, "too_long"),
    Case("A23", "ac", "company over MaxLength 100", {"first": "Long", "last": "Company", "COMPANY": OVER[100]}, QUARANTINED, "too_long"),
    Case("A24", "ac", "email over MaxLength 100", {"email": "e" * 90 + "@corpus.example.com", "first": "Long", "last": "Email"}, QUARANTINED, "too_long"),
    Case("A25", "ac", "first name exactly at MaxLength 50", {"first": "C" * 50, "last": "Limit"}, AS_IS),
    Case("A26", "ac", "accented last name at MaxLength 50", {"first": "Acc", "last": "é" * 50}, AS_IS),
    Case("A27", "ac", "conflicting tags: lead and contact", {"first": "Both", "last": "Tags"}, QUARANTINED, "both_type_tags", tags="both"),
    Case("A28", "ac", "type tag without origin tag", {"first": "Type", "last": "Only"}, NOT_SYNCED, "no_origin_tag", tags="type-only"),
    Case("A29", "ac", "origin tag without type tag", {"first": "Origin", "last": "Only"}, NOT_SYNCED, "no_type_tag", tags="origin-only"),
    Case("A30", "ac", "no D365 tag at all", {"first": "No", "last": "Tags"}, NOT_SYNCED, "no_d365_tag", tags="none"),
    Case("A31", "ac", "'Pushed from Dynamics' with no Dynamics record", {"first": "Pushed", "last": "Orphan"}, QUARANTINED, "pushed_without_dynamics_record", tags="pushed"),
    Case("A32", "ac", "'Pushed from Dynamics' contact that exists in Dynamics", {"email": "pushed.a32@corpus.example.com", "first": "Pushed", "last": "Contact"}, NORMALISED, synced={"emailaddress1": "pushed.a32@corpus.example.com"}, tags="pushed-contact", existing={"emailaddress1": "Pushed.A32@Corpus.Example.com", "lastname": "Before"}),
    Case("A33", "ac", "same email already a Dynamics lead (other case)", {"email": "twice.a33@corpus.example.com", "first": "Twice", "last": "Across"}, NORMALISED, synced={"emailaddress1": "twice.a33@corpus.example.com"}, existing={"emailaddress1": "TWICE.A33@corpus.example.com", "lastname": "Before", "subject": "Fair"}),
    Case("A34", "ac", "number in a text custom field", {"first": "Num", "last": "Field", "JOB_TITLE": "12345"}, AS_IS),
    Case("A35", "ac", "boolean and zero in custom fields", {"first": "Bool", "last": "Field", "JOB_TITLE": "true", "COMPANY": "0"}, AS_IS),
    Case("A36", "ac", "listbox-style value in a text field", {"first": "List", "last": "Field", "JOB_TITLE": "||Sales||Marketing||"}, AS_IS),
    Case("A37", "ac", "text in a field mapped to a Dynamics choice column", {"first": "Wrong", "last": "Type", "LEAD_SOURCE": "8"}, QUARANTINED, "target_rejected"),
    Case("A38", "ac", "contact: company is not mapped for contacts", {"first": "Cora", "last": "Contact", "COMPANY": "Ignored Ltd", "JOB_TITLE": "Buyer"}, AS_IS, tags="contact"),
    Case("A39", "ac", "26 emoji in a first name: 26 characters, 52 UTF-16 units over MaxLength 50", {"first": "😀" * 26, "last": "Wide"}, QUARANTINED, "too_long"),
    Case("A40", "ac", "25 emoji in a first name: 50 UTF-16 units, exactly at MaxLength 50", {"first": "😀" * 25, "last": "Wide"}, AS_IS),
    # -- typed in Dynamics 365, synced to ActiveCampaign ---------------------------------------
    Case("D01", "lead", "plain lead", {"firstname": "Dana", "lastname": "Plain", "telephone1": "+1 555 0101", "companyname": "Globex", "jobtitle": "CEO"}, AS_IS),
    Case("D02", "contact", "plain contact", {"firstname": "Cole", "lastname": "Plain", "jobtitle": "Buyer"}, AS_IS),
    Case("D03", "lead", "malformed email", {"emailaddress1": "not-an-email", "lastname": "Bad"}, QUARANTINED, "invalid_email"),
    Case("D04", "lead", "space inside the email", {"emailaddress1": "ann smith@corpus.example.com", "lastname": "Space"}, QUARANTINED, "invalid_email"),
    Case("D05", "lead", "email without a top-level domain", {"emailaddress1": "ann@localhost", "lastname": "Tld"}, QUARANTINED, "invalid_email"),
    Case("D06", "contact", "internationalised domain", {"emailaddress1": "ann@bücher.example.com", "lastname": "Idn"}, QUARANTINED, "invalid_email"),
    Case("D07", "contact", "missing email", {"emailaddress1": None, "lastname": "Mailless"}, QUARANTINED, "invalid_email"),
    Case("D08", "lead", "whitespace around the email", {"emailaddress1": "  Trim.D08@Corpus.Example.com ", "lastname": "Trim"}, NORMALISED, synced={"email": "trim.d08@corpus.example.com"}),
    Case("D09", "contact", "mixed-case email", {"emailaddress1": "MiXed.D09@Corpus.Example.COM", "lastname": "Case"}, NORMALISED, synced={"email": "mixed.d09@corpus.example.com"}),
    Case("D10", "lead", "same email twice in one batch (1)", {"emailaddress1": "dup.batch@corpus.example.com", "lastname": "First"}, QUARANTINED, "duplicate_email_in_batch"),
    Case("D11", "lead", "same email twice in one batch (2)", {"emailaddress1": "DUP.Batch@corpus.example.com", "lastname": "Second"}, QUARANTINED, "duplicate_email_in_batch"),
    Case("D12", "contact", "email already in ActiveCampaign (other case)", {"emailaddress1": "exists.d12@corpus.example.com", "firstname": "Fresh", "lastname": "Across"}, NORMALISED, synced={"email": "Exists.D12@Corpus.Example.com"}, existing={"email": "Exists.D12@Corpus.Example.com", "first": "Old", "last": "Across"}),
    Case("D13", "lead", "non-ASCII local part (ActiveCampaign refuses it)", {"emailaddress1": "jörg.d13@corpus.example.com", "lastname": "Müller"}, QUARANTINED, "target_rejected"),
    Case("D14", "lead", "NUL and tab in names", {"firstname": "Nu\x00ll", "lastname": "Ta\tb"}, NORMALISED, synced={"firstName": "Null", "lastName": "Ta b"}),
    Case("D15", "contact", "right-to-left, emoji, CJK", {"firstname": "מרים 🎉", "lastname": "李"}, AS_IS),
    Case("D16", "lead", "apostrophes in email and name", {"emailaddress1": "o'hara.d16@corpus.example.com", "firstname": "Seán", "lastname": "O'Hara"}, AS_IS),
    Case("D17", "lead", "OData-looking values", {"lastname": "' or ''='", "companyname": "x' or 1 eq 1 or 'a"}, AS_IS),
    Case("D18", "lead", "formula and HTML", {"firstname": "<b>bold</b>", "lastname": "=HYPERLINK(\"http://x.io\")", "jobtitle": "=1+1"}, AS_IS),
    Case("D19", "lead", "no last name (ActiveCampaign does not need one)", {"firstname": "Only", "lastname": None}, AS_IS),
    Case("D20", "contact", "zero as a job title", {"lastname": "Zero", "jobtitle": "0"}, AS_IS),
    Case("D21", "lead", "description over ActiveCampaign's 255", {"lastname": "Notes", "description": "n" * 300}, QUARANTINED, "too_long"),
    Case("D22", "lead", "description exactly at 255", {"lastname": "Notes", "description": "m" * 255}, AS_IS),
    Case("D23", "contact", "email at Dynamics' MaxLength 100", {"emailaddress1": "d" * 81 + "@corpus.example.com", "lastname": "Long"}, AS_IS),
]  # fmt: skip

# Ordinary records around the corpus: bad records are a minority of a real batch (a batch where
# more than safety.max_quarantine_share fail validation stops before writing, by design).
PADDING = 25

# The corpus's sync.yaml adds two custom fields to the default mapping: a text field mapped to a
# Dynamics choice column (a type Dynamics refuses), and a long Dynamics memo column.
EXTRA_MAPPING = {
    "lead": [
        {"activecampaign": "field:LEAD_SOURCE", "dynamics365": "leadsourcecode", "direction": "to_dynamics365"},
        {"activecampaign": "field:NOTES", "dynamics365": "description", "direction": "to_activecampaign"},
    ]
}  # fmt: skip
