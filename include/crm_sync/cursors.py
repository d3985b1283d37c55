"""Where each incremental read starts and how far it has got: one `Cursor` per stream a direction
polls, over a watermark of the state store.

The rules, in one place for both directions:
- a read starts at the watermark minus the overlap (`incremental.overlap_minutes`: clock skew
  and rows committed late), or, on the first run (no watermark), where `FIRST_RUN` says: a
  Dynamics -> AC entity reads every matching record then (the initial sync on first switch-on),
  unless `sync.yaml` sets its `initial_sync: manual` (from now on only);
- the initial sync reads from its form's `modified_since` (everything when empty);
- after the load, the watermark moves to the newest row read, or, when nothing was read and
  there is no watermark yet, to the start of the run's extract (everything before it has been
  seen); it never moves backwards (`StateStore.advance_watermark`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from crm_sync.core import Direction
from crm_sync.settings import Entity
from crm_sync.state import Watermark

if TYPE_CHECKING:
    from crm_sync.state import StateStore


class FirstRun(StrEnum):
    """Where a stream's read starts when it has no watermark yet."""

    EVERYTHING = "everything"  # from the beginning
    FROM_NOW = "from_now"  # from the run's start (minus the overlap): the history is not read
    SKIP = "skip"  # nothing: another stream's first read covers it


TAGGED = "tagged"  # AC contacts newly carrying a D365 tag (by tag association time)
UPDATED = "updated"  # AC contacts updated (by `udate`)
ACCOUNT = "account"  # accounts (Dataverse `modifiedon`, AC `updatedTimestamp`)
OPPORTUNITY = "opportunity"  # opportunities (Dataverse `modifiedon`)

# The first-run rule of every stream. AC -> Dynamics reads every tagged contact once (the tags
# are the queue); the updated stream then adds nothing. Dynamics -> AC reads every matching row
# once, as the native integration's initial sync does when its switch is first turned on;
# `initial_sync: manual` in `sync.yaml` makes it FROM_NOW (see `cursor`).
FIRST_RUN: dict[tuple[Direction, str], FirstRun] = {
    (Direction.TO_DYNAMICS365, TAGGED): FirstRun.EVERYTHING,
    (Direction.TO_DYNAMICS365, UPDATED): FirstRun.SKIP,
    **{(Direction.TO_ACTIVECAMPAIGN, e.value): FirstRun.EVERYTHING for e in Entity},
    # Accounts both ways and opportunities: every one on the first run (AC accounts by their
    # `updatedTimestamp`, read whole: AC has no filter on it).
    (Direction.TO_ACTIVECAMPAIGN, ACCOUNT): FirstRun.EVERYTHING,
    (Direction.TO_ACTIVECAMPAIGN, OPPORTUNITY): FirstRun.EVERYTHING,
    (Direction.TO_DYNAMICS365, ACCOUNT): FirstRun.EVERYTHING,
}


@dataclass(frozen=True)
class Read:
    """Where one read starts: `since` (None: from the beginning); `skip`: no read at all;
    `initial`: the stream's first read of everything (the initial sync on first switch-on);
    `mark`: the stored watermark (the newest change the last run read): a row read again in the
    overlap window before it is not a change since then."""

    since: datetime | None
    skip: bool = False
    initial: bool = False
    mark: datetime | None = None

    def is_new(self, changed_at: datetime | None) -> bool:
        """Whether a row changed at `changed_at` changed after the last run's newest read."""
        return self.mark is None or changed_at is None or changed_at > self.mark


@dataclass(frozen=True)
class Cursor:
    """One polled stream of a direction: `activecampaign_to_dynamics365:tagged`, ..."""

    direction: Direction
    stream: str
    overlap: timedelta
    first_run: FirstRun = FirstRun.EVERYTHING

    @property
    def name(self) -> str:
        """The watermark's name in the state store."""
        return f"{self.direction.value}:{self.stream}"

    def read(self, store: StateStore, started: datetime) -> Read:
        """Where this run's read starts (`started`: when the run's extract began)."""
        mark = store.watermark(self.name)
        if mark is not None:
            return Read(mark.value - self.overlap, mark=mark.value)
        first = self.first_run
        if first is FirstRun.EVERYTHING:
            return Read(None, initial=True)
        if first is FirstRun.SKIP:
            return Read(None, skip=True)
        return Read(started - self.overlap)

    def advance(self, store: StateStore, newest: datetime | None, started: datetime) -> None:
        """After the load: move to `newest` (the newest row read), or, with nothing read and no
        watermark yet, to `started`. Never backwards."""
        if newest is not None:
            store.advance_watermark(Watermark(name=self.name, value=newest))
        elif store.watermark(self.name) is None:
            store.advance_watermark(Watermark(name=self.name, value=started))


def backfill_read(modified_since: date | None) -> Read:
    """The initial sync's read: from its form's day (UTC midnight), or everything."""
    if modified_since is None:
        return Read(None)
    return Read(datetime(modified_since.year, modified_since.month, modified_since.day, tzinfo=UTC))


def cursor(
    direction: Direction, stream: str, overlap_minutes: int, *, manual_initial_sync: bool = False
) -> Cursor:
    """The cursor of `stream` (`TAGGED`, `UPDATED`, or an entity's name) in `direction`;
    `manual_initial_sync`: a Dynamics -> AC entity's first read starts from now instead of
    reading everything (AC -> Dynamics always reads its queue, the tagged contacts)."""
    if (direction, stream) not in FIRST_RUN:
        raise ValueError(f"{direction.value} polls no stream '{stream}'")
    first = FIRST_RUN[(direction, stream)]
    if manual_initial_sync and direction is Direction.TO_ACTIVECAMPAIGN:
        first = FirstRun.FROM_NOW
    return Cursor(direction, stream, timedelta(minutes=overlap_minutes), first)


def cursor_named(name: str, overlap_minutes: int) -> Cursor:
    """The cursor a watermark name (`<direction>:<stream>`) stands for."""
    direction, stream = name.split(":", 1)
    return cursor(Direction(direction), stream, overlap_minutes)
