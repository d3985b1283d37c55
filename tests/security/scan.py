"""The leak scanner: credentials, bearer tokens and raw emails in text, files and Airflow's XComs."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

# A JWT (Entra ID access tokens), or anything sent as a bearer credential.
BEARER = re.compile(r"eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]{8,}|Bearer\s+[\w.~+/=-]{16,}")
EMAIL = re.compile(r"[\w.%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


@dataclass(frozen=True)
class Finding:
    """One leak: where it was found, what it is, and a masked excerpt around it."""

    where: str
    what: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what} in ...{self.excerpt}..."


class Scanner:
    """Looks for the given secrets and emails, any bearer token, and (in logs) any raw email."""

    def __init__(self, secrets: dict[str, str], emails: Iterable[str]) -> None:
        self.secrets = {name: value for name, value in secrets.items() if value}
        self.emails = sorted({e.strip().lower() for e in emails if e and "@" in e})

    def text(self, where: str, text: str, *, any_email: bool = True) -> list[Finding]:
        """Findings in one text (a log, an exception message, an XCom value, a file)."""
        found = []
        lowered = text.lower()
        for name, secret in self.secrets.items():
            for form in {secret, quote(secret, safe="")}:
                if form in text:
                    found.append(Finding(where, name, _excerpt(text, text.index(form), "secret")))
        for match in BEARER.finditer(text):
            found.append(Finding(where, "bearer token", _excerpt(text, match.start(), "token")))
        for email in self.emails:
            local = email.split("@")[0]
            forms = {email, quote(email, safe=""), email.replace("'", "''")}
            for form in forms:
                if form in lowered:
                    where_at = lowered.index(form)
                    found.append(
                        Finding(
                            where, f"raw email of {local[:1]}***", _excerpt(text, where_at, "email")
                        )
                    )
        if any_email:
            for match in EMAIL.finditer(text):
                if "***" not in match.group(0):
                    found.append(
                        Finding(where, "an email address", _excerpt(text, match.start(), "email"))
                    )
        return found

    def files(self, root: Path, skip: Iterable[Path] = ()) -> list[Finding]:
        """Findings in every file under `root` (binary files read as text where they decode)."""
        skipped = [s.resolve() for s in skip]
        found = []
        for path in sorted(root.rglob("*")):
            resolved = path.resolve()
            if not path.is_file() or any(resolved == s or s in resolved.parents for s in skipped):
                continue
            text = path.read_bytes().decode("utf-8", errors="replace")
            found += self.text(f"file {path.relative_to(root)}", text, any_email=False)
        return found


def _excerpt(text: str, at: int, kind: str) -> str:
    """Up to 40 characters either side, the hit itself replaced (the report must not leak)."""
    before = text[max(0, at - 40) : at].replace("\n", " ")
    return f"{before}<{kind}>"
