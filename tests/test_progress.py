"""cascowfs/progress.py: a progress bar on stderr only when asked for, and an increment
function either way."""

from __future__ import annotations

from cascowfs.progress import progress_bar


def test_a_disabled_bar_takes_increments_and_draws_nothing(capsys):
    with progress_bar(False, 100, "importing") as tick:
        for _ in range(10):
            tick(10)
    assert capsys.readouterr() == ("", "")


def test_an_enabled_bar_counts_on_stderr_and_closes(capsys):
    with progress_bar(True, 3, "checking", unit="trees") as tick:
        for _ in range(3):
            tick(1)
    out, err = capsys.readouterr()
    assert out == ""
    assert "checking" in err and "3/3" in err and "trees" in err, err


def test_byte_counts_are_scaled_and_an_unknown_total_still_counts(capsys):
    with progress_bar(True, 0, "importing") as tick:
        tick(3 << 20)
    err = capsys.readouterr().err
    assert "importing" in err and "3.15MB" in err, err
    assert "%" not in err, f"a bar without a total shows no percentage: {err}"
