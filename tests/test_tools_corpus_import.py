"""Corpus import from an HTML folder, a CSV table (with bad rows) and a WARC archive built here."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from tools.corpus import Corpus
from tools.corpus_import import column_label, import_csv, import_html, import_warc, url_for_html_file
from tools.extract import extract_document

ARTICLE = "<html><head><title>{title}</title></head><body><article>{paras}</article></body></html>"


def html_page(title: str, sentence: str) -> str:
    return ARTICLE.format(title=title, paras=f"<p>{sentence}</p>" * 4)


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return Corpus(tmp_path / "corpus.sqlite")


def test_url_for_html_file_follows_the_folder_convention(tmp_path: Path) -> None:
    root = tmp_path / "world" / "sites"
    host = root / "www.brightlane.example"
    assert url_for_html_file(host / "about.html", root) == "https://www.brightlane.example/about"
    assert url_for_html_file(host / "index.html", root) == "https://www.brightlane.example/"
    assert url_for_html_file(host / "a" / "index.html", root) == "https://www.brightlane.example/a"
    assert url_for_html_file(host / "a" / "b.htm", root) == "https://www.brightlane.example/a/b"
    with pytest.raises(ValueError, match="host folder"):
        url_for_html_file(root / "stray.html", root)
    with pytest.raises(ValueError, match="not inside"):
        url_for_html_file(tmp_path / "x.html", root)


def test_import_html_folder_skips_undecodable_files(
    tmp_path: Path, corpus: Corpus, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "world" / "sites"
    host = root / "www.brightlane.example"
    (host / "team").mkdir(parents=True)
    (host / "index.html").write_text(
        html_page("Brightlane", "Brightlane forecasts demand."), encoding="utf-8"
    )
    (host / "about.html").write_text(html_page("About", "Founded in Austin in 2015."), encoding="utf-8")
    (host / "team" / "index.html").write_text(html_page("Team", "We are 120 people."), encoding="utf-8")
    (host / "broken.html").write_bytes(b"<html><body>\xff\xfe\xfd not utf-8</body></html>")
    (host / "notes.txt").write_text("not html", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="tools.corpus_import"):
        assert import_html(root, corpus) == 3
    assert "broken.html" in caplog.text
    about = corpus.get("https://www.brightlane.example/about")
    assert about is not None and about == extract_document(
        html_page("About", "Founded in Austin in 2015."), "https://www.brightlane.example/about"
    )
    assert corpus.get("https://www.brightlane.example/") is not None
    assert corpus.get("https://www.brightlane.example/team") is not None
    # a host folder imports the same way; a single file finds its host folder or takes url=
    other = Corpus(tmp_path / "other.sqlite")
    assert import_html(host, other) == 3
    assert import_html(host / "about.html", other) == 1
    assert import_html(host / "about.html", other, url="https://mirror.example/about") == 1
    assert other.get("https://mirror.example/about") is not None
    with pytest.raises(ValueError, match="url="):
        import_html(root, other, url="https://x.example/")
    with pytest.raises(FileNotFoundError):
        import_html(tmp_path / "nope", other)


CSV_TEXT = """company_id,company_name,short_description,long_description,year_founded,team_size,tags,website
2,Acme Robotics,Robots for warehouses,"Acme builds robots.
They ship to 40 countries.",2019.0,25.0,"['b2b', 'robotics']",acme-robotics.example
4,,Nameless,,2020.0,,[],nameless.example
6,Beta Health,Clinic software,,2015.0,,"['healthcare']",
8,Gamma Energy,Solar "farms",,nan,3.5,[],https://gamma.example/
10,Acme Robotics EU,Same site,,,,[],https://acme-robotics.example
"""


def test_import_csv_renders_rows_and_reports_bad_ones(tmp_path: Path, corpus: Corpus) -> None:
    path = tmp_path / "companies.csv"
    path.write_text(CSV_TEXT, encoding="utf-8")
    report = import_csv(
        path,
        corpus,
        name_column="company_name",
        url_column="website",
        text_columns=["short_description", "long_description", "year_founded", "team_size", "tags"],
    )
    assert report.rows_read == 5 and report.imported == 2
    assert [n for n, _ in report.skipped] == [3, 4]  # header is row 1
    assert "no name" in report.skipped[0][1] and "no URL" in report.skipped[1][1]
    assert report.duplicates == [6]
    gamma = corpus.get("https://gamma.example")
    assert gamma is not None and gamma.title == "Gamma Energy" and gamma.site_name == "gamma.example"
    assert gamma.text == 'Short description: Solar "farms"\nTeam size: 3.5'
    assert "<p><b>Short description:</b> Solar &quot;farms&quot;</p>" in gamma.html
    acme = corpus.get("https://acme-robotics.example/")
    assert acme is not None and acme.title == "Acme Robotics EU"  # the later duplicate row wins

    filtered = Corpus(tmp_path / "filtered.sqlite")
    report = import_csv(
        path,
        filtered,
        name_column="company_name",
        url_column="website",
        text_columns=["long_description", "year_founded", "tags"],
        where=lambda row: row["company_id"] in ("2", "8"),
        limit=1,
    )
    assert report.imported == 1 and report.rows_read == 1  # stops reading once the limit is reached
    acme = filtered.get("acme-robotics.example")
    assert acme is not None and acme.url == "https://acme-robotics.example"
    assert (
        acme.text == "Long description: Acme builds robots. They ship to 40 countries.\n"
        "Year founded: 2019\nTags: b2b, robotics"
    )
    assert "<title>Acme Robotics</title>" in acme.html and "Year founded:" in acme.html

    with pytest.raises(ValueError, match="no column 'homepage'"):
        import_csv(path, filtered, name_column="company_name", url_column="homepage", text_columns=[])


def test_column_label() -> None:
    assert column_label("year_founded") == "Year founded"
    assert column_label("teamSize") == "Team size"
    assert column_label("short-description") == "Short description"


def test_import_warc_takes_html_responses_only(tmp_path: Path, corpus: Corpus) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "crawl.warc.gz"
    html = html_page("Delta", "Delta Logistics moves freight in Ohio.")
    with path.open("wb") as out:
        writer = WARCWriter(out, gzip=True)

        def response(url: str, body: bytes, content_type: str, status: str = "200 OK") -> None:
            headers = StatusAndHeaders(status, [("Content-Type", content_type)], protocol="HTTP/1.1")
            writer.write_record(
                writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)
            )

        response("https://delta.example/", html.encode("utf-8"), "text/html; charset=utf-8")
        response(
            "https://delta.example/gone",
            b"<html><body><p>Gone away</p></body></html>",
            "text/html",
            "404 Not Found",
        )
        response("https://delta.example/logo.png", b"\x89PNG", "image/png")
        writer.write_record(
            writer.create_warc_record(
                "https://delta.example/", "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")
            )
        )
    assert import_warc(path, corpus) == 2
    delta = corpus.get("https://delta.example/")
    assert delta == extract_document(html, "https://delta.example/")
    gone = corpus.get("https://delta.example/gone")
    assert gone is not None and gone.status_code == 404
    assert corpus.get("https://delta.example/logo.png") is None
