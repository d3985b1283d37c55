"""The mass-change breaker: relinks (records matched by email, no link) are held even with no
links, and only they are counted then, so one relink among ordinary creates trips nothing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from crm_sync.core import CircuitBreakerTripped
from crm_sync.flows.common import check_mass_change
from crm_sync.params import RunParams
from crm_sync.settings import DEFAULT_SETTINGS_PATH, load_settings
from crm_sync.state import RecordLink, StateStore


def context(tmp_path: Path, links: int = 0, **params: bool) -> SimpleNamespace:
    store = StateStore.from_url(f"sqlite:///{tmp_path / 'state.db'}")
    store.save_links(
        [
            RecordLink(
                "lead",
                f"id{n}",
                f"{n}",
                f"p{n}@example.com",
                "dynamics365",
                None,
                None,
                {},
                None,
                None,
            )
            for n in range(links)
        ]
    )
    return SimpleNamespace(
        settings=load_settings(DEFAULT_SETTINGS_PATH),
        store=store,
        run_params=RunParams(confirm_mass_change=bool(params.get("confirm_mass_change"))),
        dry_run=False,
    )


@pytest.mark.parametrize(("changes", "relinked"), [(11, 11), (50, 11)])
def test_relinks_trip_the_breaker_with_no_links(
    tmp_path: Path, changes: int, relinked: int
) -> None:
    with pytest.raises(CircuitBreakerTripped, match="overwrite 11 records found by email"):
        check_mass_change(context(tmp_path), changes, relinked=relinked)


def test_one_relink_among_many_creates_trips_nothing(tmp_path: Path) -> None:
    check_mass_change(context(tmp_path), 50, relinked=1)


def test_ordinary_changes_with_few_links_trip_nothing(tmp_path: Path) -> None:
    check_mass_change(context(tmp_path, links=5), 50)


def test_a_confirmation_lets_relinks_through(tmp_path: Path) -> None:
    check_mass_change(context(tmp_path, confirm_mass_change=True), 40, relinked=40)


def test_with_enough_links_the_share_of_all_changes_counts(tmp_path: Path) -> None:
    ctx = context(tmp_path, links=100)
    check_mass_change(ctx, 10, relinked=10)
    with pytest.raises(CircuitBreakerTripped, match="change 11 records"):
        check_mass_change(ctx, 11, relinked=1)
