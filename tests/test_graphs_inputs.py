"""Prospects CSV and offer TOML: malformed rows are reported by row number and skipped; values have length
limits; an empty file or one without a website column is said so."""

from __future__ import annotations

import pytest
import tomli_w

from agents.schemas import Offer
from graphs.inputs import (
    NO_ROWS,
    NO_WEBSITE_COLUMN,
    OFFER_LIMITS,
    PROSPECT_COLUMNS,
    PROSPECT_LIMITS,
    InputError,
    load_offer,
    read_prospects_csv,
)

HEADER = "first_name,last_name,title,email,company,website\n"


def test_bad_rows_are_reported_with_row_numbers_and_skipped(tmp_path):
    path = tmp_path / "p.csv"
    rows = [
        "Ana,Ruiz,CTO,ana@acme.example,Acme,https://acme.example\n",      # row 2 ok
        "Bo,Li,CEO,,Beta,https://beta.example\n",                          # row 3 missing email
        "Cy,Oh,VP,cy@gamma.example,Gamma,not a url\n",                     # row 4 bad URL
        "Di,Ng,VP,di-at-delta,Delta,delta.example\n",                      # row 5 bad email
    ]
    latin1 = "Ève,Dûr,CFO,eve@eps.example,Épsilon,https://eps.example\n".encode("latin-1")  # row 6 not UTF-8
    tail = "Fa,Xu,COO,fa@zeta.example,Zeta,zeta.example\n"                  # row 7 ok, schemeless URL
    path.write_bytes((HEADER + "".join(rows)).encode() + latin1 + tail.encode())
    parsed = read_prospects_csv(path)
    assert [row for row, _ in parsed.prospects] == [2, 7]
    assert parsed.prospects[1][1].website == "https://zeta.example"
    reasons = {e.row: e.reason for e in parsed.errors}
    assert set(reasons) == {3, 4, 5, 6}
    assert "email" in reasons[3] and "website" in reasons[4] and "email" in reasons[5] and "UTF-8" in reasons[6]


def test_missing_columns_and_missing_file_are_clear(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("name,mail\nA,a@x.example\n")
    with pytest.raises(InputError, match="lacks the column"):
        read_prospects_csv(path)
    with pytest.raises(InputError, match="cannot read"):
        read_prospects_csv(tmp_path / "nope.csv")


def test_offer_errors_name_the_fields(tmp_path):
    path = tmp_path / "offer.toml"
    path.write_text('sender_name = "A"\nproduct = "P"\n')
    with pytest.raises(InputError, match="sender_company"):
        load_offer(path)
    path.write_text("this is = = not toml")
    with pytest.raises(InputError, match="not valid TOML"):
        load_offer(path)


def test_a_field_over_the_csv_limit_fails_its_row_only(tmp_path):
    path = tmp_path / "p.csv"
    huge = "x" * 140_000  # over Python's 131,072-character csv field limit
    path.write_text(HEADER + "Ana,Ruiz,CTO,ana@acme.example,Acme,acme.example\n"
                    f"Bo,Li,{huge},bo@beta.example,Beta,beta.example\n"
                    "Cy,Oh,VP,cy@gamma.example,Gamma,gamma.example\n", encoding="utf-8")
    parsed = read_prospects_csv(path)
    assert [row for row, _ in parsed.prospects] == [2, 4]
    (error,) = parsed.errors
    assert error.row == 3 and "131,072" in error.reason


def test_values_over_their_length_limit_are_refused_with_field_and_limit(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(HEADER + f"{'A' * 101},Ruiz,CTO,ana@acme.example,Acme,acme.example\n"
                    f"Bo,Li,{'t' * 201},bo@beta.example,Beta,beta.example\n"
                    f"Cy,Oh,VP,cy@gamma.example,{'G' * 200},gamma.example\n", encoding="utf-8")
    parsed = read_prospects_csv(path)
    assert [row for row, _ in parsed.prospects] == [4]  # exactly at the limit is fine
    reasons = {e.row: e.reason for e in parsed.errors}
    assert "first_name is 101 characters; the limit is 100" in reasons[2]
    assert "title is 201 characters; the limit is 200" in reasons[3]
    assert set(PROSPECT_LIMITS) == set(PROSPECT_COLUMNS)


def test_a_100_kb_offer_value_is_refused(tmp_path):
    path = tmp_path / "offer.toml"
    offer = {"sender_name": "Sam", "sender_company": "W", "product": "P", "call_to_action": "Call?"}
    path.write_text(tomli_w.dumps({**offer, "value_proposition": "word " * 20_480}), encoding="utf-8")
    with pytest.raises(InputError, match="value_proposition is 102,400 characters; the limit is 600"):
        load_offer(path)
    assert set(OFFER_LIMITS) == {n for n, f in Offer.model_fields.items() if f.annotation is str}


def test_offer_sender_email_is_optional_and_validated(tmp_path):
    path = tmp_path / "offer.toml"
    offer = {"sender_name": "Sam", "sender_company": "W", "product": "P", "value_proposition": "V",
             "call_to_action": "Call?"}
    path.write_text(tomli_w.dumps(offer), encoding="utf-8")
    assert load_offer(path).sender_email == ""
    path.write_text(tomli_w.dumps({**offer, "sender_email": "Sam@Widgets.Example"}), encoding="utf-8")
    assert load_offer(path).sender_email == "Sam@widgets.example"
    path.write_text(tomli_w.dumps({**offer, "sender_email": "sam at widgets"}), encoding="utf-8")
    with pytest.raises(InputError, match="sender_email 'sam at widgets' is not an e-mail address"):
        load_offer(path)


def test_a_file_without_website_column_warns_once(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("first_name,email,company\nAna,ana@acme.example,Acme\nBo,bo@beta.example,Beta\n")
    parsed = read_prospects_csv(path)
    assert len(parsed.prospects) == 2 and not parsed.errors
    assert parsed.warnings == [NO_WEBSITE_COLUMN] and "optional" in NO_WEBSITE_COLUMN
    path.write_text(HEADER + "Ana,Ruiz,CTO,ana@acme.example,Acme,\n")
    assert read_prospects_csv(path).warnings == []


def test_missing_columns_name_required_and_optional_apart(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("first_name,company\nAna,Acme\n")
    with pytest.raises(InputError) as info:
        read_prospects_csv(path)
    message = str(info.value)
    assert "lacks the column(s) email;" in message and "may have last_name, title, website" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n", "\ufeff"])
def test_an_empty_file_is_reported_as_empty(tmp_path, content):
    path = tmp_path / "p.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match="is empty"):
        read_prospects_csv(path)


def test_a_header_without_rows_is_said_and_not_an_error(tmp_path):
    path = tmp_path / "p.csv"  # a demo world's held-out split when --heldout 0
    path.write_text(HEADER + "\n")
    parsed = read_prospects_csv(path)
    assert (parsed.prospects, parsed.errors, parsed.warnings) == ([], [], [NO_ROWS])
