"""The trigger parameters of a run, checked once: unknown keys and wrong types refuse the run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from crm_sync.core import Flow

COMMON = ("dry_run", "confirm_mass_change")
BACKFILL_ONLY = ("entities", "modified_since", "batch_size")
ENTITY_CHOICES = ("both", "lead", "contact")
BATCH_SIZE_RANGE = (10, 250)


class TriggerParamsError(ValueError):
    """The run's trigger parameters (`--conf`, the trigger form) cannot be used; the message
    names the parameter and what is accepted. Retrying cannot help."""


def accepted(flow: Flow) -> tuple[str, ...]:
    """The parameters a run of `flow` accepts (the DAG's declared params), sorted."""
    return tuple(sorted(COMMON + (BACKFILL_ONLY if flow is Flow.BACKFILL else ())))


@dataclass(frozen=True)
class RunParams:
    """A run's parameters, typed. The backfill-only ones keep their defaults elsewhere."""

    dry_run: bool = False
    confirm_mass_change: bool = False
    entities: str = "both"
    modified_since: date | None = None
    batch_size: int = 250

    @classmethod
    def parse(
        cls, flow: Flow, params: dict[str, Any], conf: dict[str, Any] | None = None
    ) -> RunParams:
        """Check `params` (the DAG's params as Airflow resolved them) and `conf` (the trigger's
        own keys) against the parameters `flow` declares; raise `TriggerParamsError` naming the
        first unknown key or the first wrong value."""
        names = accepted(flow)
        unknown = sorted((set(conf or {}) | set(params)) - set(names))
        if unknown:
            listed = ", ".join(repr(k) for k in unknown)
            noun = "parameter" if len(unknown) == 1 else "parameters"
            raise TriggerParamsError(
                f"unknown trigger {noun} {listed}; accepted: {', '.join(names)}. "
                "Nothing was read or written: trigger the DAG again with the right names"
            )
        values: dict[str, Any] = {}
        for name in ("dry_run", "confirm_mass_change"):
            if name in params:
                values[name] = _boolean(name, params[name])
        if "entities" in params:
            values["entities"] = _choice("entities", params["entities"], ENTITY_CHOICES)
        if "modified_since" in params:
            values["modified_since"] = _date("modified_since", params["modified_since"])
        if "batch_size" in params:
            values["batch_size"] = _integer("batch_size", params["batch_size"], BATCH_SIZE_RANGE)
        return cls(**values)


def _wrong(name: str, value: Any, expected: str) -> TriggerParamsError:
    shown = (
        repr(value) if isinstance(value, bool | int | float | type(None)) else type(value).__name__
    )
    if isinstance(value, str):
        shown = repr(value[:40])
    return TriggerParamsError(
        f"trigger parameter '{name}' must be {expected} (got {shown}). Nothing was read or "
        "written: trigger the DAG again with a valid value"
    )


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _wrong(name, value, "true or false (a JSON boolean)")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise _wrong(name, value, "one of " + ", ".join(choices))


def _date(name: str, value: Any) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise _wrong(name, value, "a date (YYYY-MM-DD) or empty")


def _integer(name: str, value: Any, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    raise _wrong(name, value, f"a whole number from {low} to {high}")
