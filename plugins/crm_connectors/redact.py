"""Masking of email addresses in anything the hooks log or put in an error message."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote, urlsplit

# Local part: the usual characters, plus an apostrophe anywhere but first (O'Neil), so that an
# OData literal's opening quote stays outside the match.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-][A-Za-z0-9._%+'-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_MAX_QUERY = 160


def mask_emails(text: str) -> str:
    """`text` with every email address replaced by `<email>`."""
    return _EMAIL.sub("<email>", text)


def loggable_url(url: str) -> str:
    """Path and query of `url`, decoded, emails masked, and long paging tokens cut short."""
    parts = urlsplit(url)
    text = unquote(parts.path)
    if parts.query:
        query = unquote(parts.query.replace("+", " "))
        if len(query) > _MAX_QUERY:
            query = query[:_MAX_QUERY] + "..."
        text = f"{text}?{query}"
    return mask_emails(text)


class EmailMaskingFilter(logging.Filter):
    """Masks emails in a library's log records (urllib3 logs every request line with its query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                mask_emails(unquote(arg)) if isinstance(arg, str) else arg for arg in record.args
            )
        elif not record.args and isinstance(record.msg, str):
            record.msg = mask_emails(unquote(record.msg))
        return True


_installed = False


def install_library_log_masking() -> None:
    """Attach `EmailMaskingFilter` to urllib3's request logger once per process."""
    global _installed
    if not _installed:
        logging.getLogger("urllib3.connectionpool").addFilter(EmailMaskingFilter())
        _installed = True
