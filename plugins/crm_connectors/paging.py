"""Paginators: from one page's JSON to the next page's token, guarded against a stuck token."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

from crm_connectors.errors import PagingError

Page = dict[str, Any]

_START = object()


class Paginator(ABC):
    """One paging scheme. `get_next` reads a page; the base class refuses a token that repeats."""

    def __init__(self, *, service: str = "", endpoint: str = "") -> None:
        self.service = service
        self.endpoint = endpoint
        self._previous: Any = _START

    @abstractmethod
    def get_next(self, page: Page) -> Any | None:
        """The next page's token, or None when `page` was the last one."""

    @abstractmethod
    def params(self, token: Any | None) -> dict[str, Any]:
        """Query parameters that ask for the page of `token` (None: the first page)."""

    def next_token(self, page: Page) -> Any | None:
        """`get_next(page)`, raising `PagingError` instead of returning the same token again."""
        token = self.get_next(page)
        if token is not None and token == self._previous:
            self.fail(f"the next-page token did not advance ({type(self).__name__})")
        self._previous = token
        return token

    def fail(self, message: str) -> None:
        """Raise a `PagingError` about this endpoint."""
        raise PagingError(message, service=self.service, method="GET", endpoint=self.endpoint)


class OffsetPaginator(Paginator):
    """`limit` + `offset`; stops on a short page or when `meta.total` is reached."""

    def __init__(self, items_key: str, *, limit: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.items_key = items_key
        self.limit = limit
        self.offset = 0

    def get_next(self, page: Page) -> int | None:
        items = page.get(self.items_key) or []
        total = _as_int((page.get("meta") or {}).get("total"))
        if len(items) < self.limit or (total is not None and self.offset + self.limit >= total):
            return None
        self.offset += self.limit
        return self.offset

    def params(self, token: int | None) -> dict[str, Any]:
        return {"limit": self.limit, "offset": token or 0}


class KeysetPaginator(Paginator):
    """`orders[id]=ASC` + `id_greater=<last id>`: stable under inserts, cheap on large sets."""

    def __init__(self, items_key: str, *, limit: int = 100, key: str = "id", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.items_key = items_key
        self.limit = limit
        self.key = key

    def get_next(self, page: Page) -> int | None:
        items = page.get(self.items_key) or []
        if not items:
            return None
        last = int(items[-1][self.key])
        if self._previous is not _START and self._previous is not None and last < self._previous:
            self.fail("the id keyset went backwards (is id_greater ignored?)")
        return last if len(items) >= self.limit else None

    def params(self, token: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": self.limit, f"orders[{self.key}]": "ASC"}
        if token is not None:
            params[f"{self.key}_greater"] = token
        return params


class NextLinkPaginator(Paginator):
    """OData `@odata.nextLink`: follow the absolute link unchanged until it is absent."""

    def get_next(self, page: Page) -> str | None:
        return page.get("@odata.nextLink")

    def params(self, token: str | None) -> dict[str, Any]:
        return {}


def iterate_pages(fetch: Callable[[Any | None], Page], paginator: Paginator) -> Iterator[Page]:
    """Yield pages: `fetch(None)` first, then `fetch(token)` while the paginator gives a token."""
    token: Any | None = None
    while True:
        page = fetch(token)
        yield page
        token = paginator.next_token(page)
        if token is None:
            return


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
