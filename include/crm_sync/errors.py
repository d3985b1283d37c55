"""Errors of the sync library that are not about one record."""

from __future__ import annotations


class ConfigurationError(Exception):
    """The set-up (sync.yaml, a connection, the accounts' schema or credentials) stops every run.

    Retrying cannot help: the task fails at once, and the message names what to fix.
    """
