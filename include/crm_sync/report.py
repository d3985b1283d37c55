"""Readable task-log summaries: counts by class and reason, masked samples, never raw personal data."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger("crm_sync")


def table(title: str, rows: Iterable[tuple[str, Any]]) -> str:
    """A two-column text table, e.g. for `counts by action`."""
    rows = [(str(k), str(v)) for k, v in rows]
    if not rows:
        return f"{title}: (nothing)"
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 10)]
    lines += [f"  {k.ljust(width)}  {v.rjust(6)}" for k, v in rows]
    return "\n".join(lines)


def count_table(title: str, counts: Mapping[str, int]) -> str:
    """`table` of counts, largest first, zeros left out."""
    return table(title, sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: -kv[1]))


def log_counts(title: str, counts: Mapping[str, int]) -> None:
    """Log a count table at INFO."""
    log.info("\n%s", count_table(title, counts))


# How an action reads in the summaries: one word for the quarantine in every step's counts.
ACTION_LABELS = {"quarantine": "quarantined"}


def reason_counts(pairs: Iterable[tuple[str, str]]) -> Counter[str]:
    """Counts of `action: reason` labels (the reason left out when empty); a quarantined record
    reads `quarantined: <reason>`, as in `validate` and `load`."""
    labels = ((ACTION_LABELS.get(action, action), reason) for action, reason in pairs)
    return Counter(f"{label}: {reason}" if reason else label for label, reason in labels)
