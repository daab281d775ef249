"""Pure pieces of the operator views: how a range is split over the roll-ups, the
PostgreSQL parameter renumbering, cursors, CSV cells, percentiles and `until` parsing."""

from __future__ import annotations

import csv
import io

import pytest

from proxy.admin_stats import decode_cursor, encode_cursor
from proxy.errors import InvalidRequest
from proxy.store.ledger import DAY, HOUR, LEVELS, cover, numbered
from proxy.views import csv_text, parse_until, percentile

pytestmark = pytest.mark.fast  # pure units: no sockets (see README, "Run the tests")

D0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def covered(pieces: list[tuple[str | None, float, float | None]]) -> list[tuple[float, float | None]]:
    return sorted((lo, hi) for _, lo, hi in pieces)


def test_cover_reads_whole_days_then_whole_hours_then_raw_rows() -> None:
    since, until = D0 + 2 * HOUR + 10, D0 + 3 * DAY + 5 * HOUR + 20
    pieces = cover(since, until)
    assert pieces == [
        ("usage_daily", D0 + DAY, D0 + 3 * DAY),
        ("usage_hourly", D0 + 3 * HOUR, D0 + DAY),
        (None, since, D0 + 3 * HOUR),
        ("usage_hourly", D0 + 3 * DAY, D0 + 3 * DAY + 5 * HOUR),
        (None, D0 + 3 * DAY + 5 * HOUR, until),
    ]
    # The pieces tile [since, until) exactly: no gap, no overlap.
    spans = covered(pieces)
    assert spans[0][0] == since and spans[-1][1] == until
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize(
    ("since", "until", "want"),
    [
        (D0, D0 + DAY, [("usage_daily", D0, D0 + DAY)]),  # aligned: one piece
        (D0 + 10, D0 + 20, [(None, D0 + 10, D0 + 20)]),  # inside one hour: raw rows only
        (D0 + 20, D0 + 10, []),  # empty range
        (D0 + 10, None, [("usage_daily", D0 + DAY, None), ("usage_hourly", D0 + HOUR, D0 + DAY), (None, D0 + 10, D0 + HOUR)]),
    ],
)
def test_cover_edges(since: float, until: float | None, want: list[tuple[str | None, float, float | None]]) -> None:
    assert cover(since, until) == want


def test_hourly_series_never_read_the_daily_roll_up() -> None:
    hourly_only = tuple(level for level in LEVELS if level[1] <= HOUR)
    assert {t for t, _, _ in cover(D0 + 5, D0 + 5 * DAY, hourly_only)} == {"usage_hourly", None}


def test_numbered_parameters_leave_casts_alone() -> None:
    sql, args = numbered("SELECT x::bigint FROM t WHERE a = :a AND b < :b OR a > :a AND c::text = :c_1", {"a": 1, "b": 2, "c_1": "z"})
    assert sql == "SELECT x::bigint FROM t WHERE a = $1 AND b < $2 OR a > $1 AND c::text = $3"
    assert args == [1, 2, "z"]


def test_cursor_round_trip_and_refusal() -> None:
    for ts, rid in ((1765000000.123456789, "req_abc"), (0.0, "x\ny"), (1e12, "ключ")):
        assert decode_cursor(encode_cursor(ts, rid)) == (ts, rid)
    for bad in ("", "%%%", "bm90IGEgY3Vyc29y", encode_cursor(1.0, "")[:-2], "aW5mCng"):  # "inf\nx"
        with pytest.raises(InvalidRequest):
            decode_cursor(bad)


def test_csv_cells_a_spreadsheet_would_run_are_quoted() -> None:
    rows = [{"name": "=HYPERLINK(\"x\")", "n": -3, "ok": True, "none": None, "text": "a,b\nc"}]
    text = csv_text(rows, ["name", "n", "ok", "none", "text"])
    assert text.startswith("name,n,ok,none,text\r\n")
    [row] = list(csv.DictReader(io.StringIO(text)))
    assert row == {"name": "'=HYPERLINK(\"x\")", "n": "-3", "ok": "true", "none": "", "text": "a,b\nc"}
    assert csv_text([], ["a"], header=False) == ""


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.95) == 95.0 and percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.95) == 7.0 and percentile([], 0.5) is None


def test_parse_until_takes_unix_seconds_iso_and_relative() -> None:
    assert parse_until("1767225600") == D0
    assert parse_until("2026-01-01T00:00:00Z") == D0
    assert parse_until("2026-01-01") == D0
    assert parse_until("1h", now=D0 + 7200) == D0 + 3600
    for bad in ("soon", "99999999999999", "1e5"):
        with pytest.raises(ValueError):
            parse_until(bad)
