"""SnapshotStore and SnapshotWeb over the web_snapshots table (SQLite; PostgreSQL when configured)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from tools.extract import extract_document
from tools.snapshots import SnapshotStore, SnapshotWeb
from tools.types import FetchError, SearchError, SearchHit

OLD = (
    "<html><head><title>Acme</title></head><body><article>"
    + "<p>Acme made 10 anvils.</p>" * 4
    + "</article></body></html>"
)
NEW = OLD.replace("10 anvils", "20 anvils")


def test_save_and_latest(engine: Engine) -> None:
    store = SnapshotStore(engine)
    first = store.save("https://acme.example", "https://www.acme.example/", 200, "text/html", OLD)
    second = store.save("https://acme.example", "https://www.acme.example/", 200, "text/html", NEW)
    assert second > first and store.count() == 2
    latest = store.latest("https://acme.example")
    assert latest is not None and latest.id == second and "20 anvils" in latest.html
    # the final URL, a trailing slash and http for https all find it too
    for form in ("https://www.acme.example/", "https://acme.example/", "http://acme.example"):
        found = store.latest(form)
        assert found is not None and found.id == second, form
    assert store.latest("https://elsewhere.example/") is None


class FakeSearch:
    async def search(self, query: str, *, max_results: int = 8) -> list[SearchHit]:
        return [SearchHit(url="https://acme.example/", title=query)]


async def test_snapshot_web_replays_extracted_pages(engine: Engine) -> None:
    store = SnapshotStore(engine)
    store.save("https://acme.example/", "https://acme.example/", 200, "text/html", NEW)
    store.save("https://acme.example/gone", "https://acme.example/gone", 410, "text/html", "<p>gone</p>")
    web = SnapshotWeb(engine)
    doc = await web.fetch("https://acme.example/")
    assert doc == extract_document(NEW, "https://acme.example/")
    with pytest.raises(FetchError) as info:
        await web.fetch("https://acme.example/never-fetched")
    assert info.value.reason == "not-in-snapshot"
    with pytest.raises(FetchError) as info:
        await web.fetch("https://acme.example/gone")
    assert info.value.reason == "status" and "410" in str(info.value)
    with pytest.raises(SearchError, match="give it a search backend"):
        await web.search("acme")
    assert (await SnapshotWeb(engine, FakeSearch()).search("acme"))[0].title == "acme"
