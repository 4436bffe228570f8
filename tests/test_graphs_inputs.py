"""Prospects CSV and offer TOML: malformed rows are reported by row number and skipped."""

from __future__ import annotations

import pytest

from graphs.inputs import InputError, load_offer, read_prospects_csv

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
