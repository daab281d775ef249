"""bench.instructions: reading callgrind's dump, and a clear refusal without valgrind.

The measurement itself runs the gateway under valgrind for a minute, which is a bench,
not a test; these check the parts that decide what it reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import instructions


def test_counted_reads_the_total_of_the_dump(tmp_path: Path) -> None:
    # callgrind_control -d writes <file>.1; the file without a suffix is written at exit
    # and must not be read (it holds what ran after the dump).
    (tmp_path / "callgrind.out.42").write_text("events: Ir\nsummary: 999\n")
    (tmp_path / "callgrind.out.42.1").write_text("# callgrind format\nversion: 1\nevents: Ir\nsummary: 123456\nfn=x\n0 5\n")
    assert instructions._counted(tmp_path) == 123456
    (tmp_path / "callgrind.out.42.1").write_text("events: Ir\nfn=x\n0 5\ntotals: 777\n")
    assert instructions._counted(tmp_path) == 777


def test_counted_without_a_dump_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no dump"):
        instructions._counted(tmp_path)
    (tmp_path / "callgrind.out.1.1").write_text("events: Ir\n")
    with pytest.raises(RuntimeError, match="no instruction total"):
        instructions._counted(tmp_path)


def test_without_valgrind_it_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(instructions, "VALGRIND", None)
    assert instructions.main(["--seconds", "1"]) == 1
    assert "valgrind" in capsys.readouterr().err
