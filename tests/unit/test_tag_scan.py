"""Tag discovery under AC's unstable order of tied rows, against an in-memory fake of the API.

AC sorts `GET /contactTags?orders[cdate]=DESC` in MySQL with no tiebreak, so the associations of
one second (a bulk import, an automation run) may come in a new order on every page: offset
paging then skips some and repeats others. `contact_tags_by_tag` must still return every
association at or after `since` exactly once, or raise; never skip one silently.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from crm_connectors.activecampaign import ActiveCampaignHook

ACCOUNT_TZ = timezone(timedelta(hours=-5))
EPOCH = 1_740_000_000
TAG = "7"


def stamp(second: int) -> str:
    return datetime.fromtimestamp(second, ACCOUNT_TZ).isoformat()


class FakeAC:
    """`GET /contactTags` and `GET /contacts?tagid=` over in-memory associations.

    Ties under `orders[cdate]` are shuffled per request, as on AC. `stable_default=False` also
    shuffles the order of a request without `orders[...]` (AC does not document that order);
    `cdate_filter=False` ignores `filters[cdate]` (as AC ignores a filter it does not know).
    """

    def __init__(
        self,
        seconds: list[int],
        *,
        tag: str = TAG,
        stable_default: bool = True,
        cdate_filter: bool = True,
        shuffle_ties: bool = True,
        seed: int = 0,
    ) -> None:
        self.rows = [
            {"id": str(i + 1), "contact": str(1000 + i), "tag": tag, "cdate": stamp(s)}
            for i, s in enumerate(seconds)
        ]
        self.stable_default = stable_default
        self.cdate_filter = cdate_filter
        self.shuffle_ties = shuffle_ties
        self.rng = random.Random(seed)
        self.requests: list[dict[str, Any]] = []

    def get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        self.requests.append({"path": path, **params})
        limit, offset = min(int(params.get("limit", 20)), 100), int(params.get("offset", 0))
        if path.endswith("/contacts"):
            return self._contacts(params, limit, offset)
        rows = [r for r in self.rows if r["tag"] == params.get("filters[tagid]", r["tag"])]
        if self.cdate_filter and "filters[cdate]" in params:
            wanted = datetime.fromisoformat(params["filters[cdate]"])
            rows = [r for r in rows if datetime.fromisoformat(r["cdate"]) == wanted]
        noise = {r["id"]: self.rng.random() if self.shuffle_ties else int(r["id"]) for r in rows}
        direction = params.get("orders[cdate]")
        if direction:
            sign = -1 if direction == "DESC" else 1
            rows.sort(key=lambda r: (sign * datetime.fromisoformat(r["cdate"]).timestamp(),
                                     noise[r["id"]]))  # fmt: skip
        elif not self.stable_default:
            rows.sort(key=lambda r: noise[r["id"]])
        return {"contactTags": rows[offset : offset + limit], "meta": {"total": str(len(rows))}}

    def _contacts(self, params: dict[str, Any], limit: int, offset: int) -> dict[str, Any]:
        tagged = sorted(
            {int(r["contact"]) for r in self.rows if r["tag"] == params.get("tagid", r["tag"])}
        )
        after = int(params.get("id_greater", 0))
        page = [c for c in tagged if c > after][:limit]
        return {"contacts": [{"id": str(c), "email": f"c{c}@example.com"} for c in page],
                "meta": {"total": str(len(tagged))}}  # fmt: skip


class FakeHook(ActiveCampaignHook):
    """The real hook's logic, answered by a `FakeAC` instead of HTTP."""

    def __init__(self, fake: FakeAC) -> None:
        super().__init__(rate_limit=None)
        self.fake = fake

    def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        params = kwargs.get("params") or {}
        return self.fake.get(path, dict(params.items() if isinstance(params, dict) else params))


def scan(fake: FakeAC, since: int | None = None) -> list[str]:
    moment = datetime.fromtimestamp(since, UTC) if since is not None else None
    return [row["id"] for row in FakeHook(fake).contact_tags_by_tag(TAG, since=moment)]


def expected(fake: FakeAC, since: int | None = None) -> set[str]:
    floor = since if since is not None else 0
    return {r["id"] for r in fake.rows if datetime.fromisoformat(r["cdate"]).timestamp() >= floor}


def test_one_thousand_associations_of_one_second_are_each_read_once() -> None:
    fake = FakeAC([EPOCH] * 1000)
    ids = scan(fake)
    assert len(ids) == 1000
    assert set(ids) == expected(fake)
    # The newest page shows one second filling it; that second is then read whole (10 pages).
    assert len(fake.requests) == 11
    again = FakeAC([EPOCH] * 1000, seed=1)
    assert sorted(scan(again, since=EPOCH)) == sorted(expected(again))


@pytest.mark.parametrize("seed", range(40))
def test_any_layout_of_seconds_is_read_exactly_from_any_since(seed: int) -> None:
    rng = random.Random(seed)
    seconds: list[int] = []
    second = EPOCH
    for _ in range(rng.randint(1, 12)):
        second += rng.randint(1, 3)
        size = rng.choice([1, 2, 5, 30, 60, 99, 100, 101, 150, 250])
        seconds += [second] * size
    rng.shuffle(seconds)  # association ids need not follow their seconds
    fake = FakeAC(seconds, seed=seed)
    since = rng.choice([None, EPOCH, *sorted(set(seconds)), second + 1])
    ids = scan(fake, since)
    assert len(ids) == len(set(ids))
    assert set(ids) == expected(fake, since)


def test_distinct_seconds_cost_what_plain_offset_paging_costs() -> None:
    fake = FakeAC([EPOCH + i for i in range(1000)])
    assert set(scan(fake)) == expected(fake)
    assert len(fake.requests) == 10
    # A second running past a page's end costs one request more, unless the rows read of it
    # already account for all of it (a service whose tie order happens to hold still).
    split = [EPOCH + 1] * 75 + [EPOCH] * 75
    for shuffle, cost in ((True, 3), (False, 2)):
        fake = FakeAC(split, shuffle_ties=shuffle, seed=2)
        assert sorted(scan(fake)) == sorted(expected(fake))
        assert len(fake.requests) == cost
    quiet = FakeAC([EPOCH + i for i in range(1000)])
    assert scan(quiet, since=EPOCH + 2000) == []
    assert len(quiet.requests) == 1


def test_a_second_read_whole_is_checked_against_its_total_or_raises() -> None:
    """If AC's order without `orders[...]` were unstable too, a second of more than one page
    could not be read exactly: the scan says so instead of returning a partial set."""
    from crm_connectors.errors import PagingError, TieOrderError

    assert issubclass(TieOrderError, PagingError)
    with pytest.raises(TieOrderError):
        scan(FakeAC([EPOCH] * 300, stable_default=False, seed=3))
    # A second of at most one page needs no order at all.
    small = FakeAC([EPOCH] * 60 + [EPOCH + 1] * 80, stable_default=False, seed=4)
    assert sorted(scan(small)) == sorted(expected(small))
    # A service that ignored filters[cdate] would answer other seconds: refused as well.
    with pytest.raises(TieOrderError):
        scan(FakeAC([EPOCH] * 150 + [EPOCH - 5] * 150, cdate_filter=False, seed=5))


class LeadTagHook(FakeHook):
    """A hook whose account has `TAG` as the id of 'D365: Lead' (the other tags elsewhere)."""

    def find_or_create_tags(self, names: Any) -> dict[str, str]:
        from crm_sync.tags import Tag

        return {name: (TAG if name == Tag.LEAD.value else f"9{i}") for i, name in enumerate(names)}


def test_tagged_since_falls_back_to_the_tag_members_when_a_second_cannot_be_read() -> None:
    from crm_sync.flows.activecampaign import ActiveCampaignReader
    from crm_sync.tags import ALL_TAGS, Tag

    fake = FakeAC([EPOCH] * 300 + [EPOCH + 9] * 5, stable_default=False, seed=6)

    reader = ActiveCampaignReader(LeadTagHook(fake), [])
    ids, newest = reader.tagged_since(datetime.fromtimestamp(EPOCH - 60, UTC))
    assert ids == {r["contact"] for r in fake.rows}
    assert newest == datetime.fromtimestamp(EPOCH + 9, UTC)
    assert reader.seen[Tag.LEAD] == ids
    # Every member of the tag was read, so nobody is asked about it again.
    before = len(fake.requests)
    flags = reader.tag_flags(sorted(ids))
    assert flags[Tag.LEAD] == ids
    assert all(not flags[t] for t in ALL_TAGS if t is not Tag.LEAD)
    asked = [r for r in fake.requests[before:] if r.get("tagid") == TAG]
    assert asked == []


def test_the_watermark_never_passes_an_unread_association() -> None:
    """A bulk run's second, then a newer association an hour later: the newest time becomes the
    watermark, so every association of the older second must have been read by then."""
    from crm_sync.flows.activecampaign import ActiveCampaignReader

    fake = FakeAC([EPOCH] * 300 + [EPOCH + 3600] * 5, seed=8)

    reader = ActiveCampaignReader(LeadTagHook(fake), [])
    ids, newest = reader.tagged_since(datetime.fromtimestamp(EPOCH - 60, UTC))
    assert newest == datetime.fromtimestamp(EPOCH + 3600, UTC)
    assert ids == {r["contact"] for r in fake.rows}
