"""The real-library harness prints its table at the end of the run (and writes
it next to the download cache, ``realcode-table.md``)."""

from __future__ import annotations

import realcode_harness

ROWS: list[dict] = []


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "realcode_slow: a slow library suite, run only when "
                                       "FLYDEPLOY_REALCODE_ALL=1")


def pytest_terminal_summary(terminalreporter) -> None:
    if not ROWS:
        return
    text = realcode_harness.table(sorted(ROWS, key=lambda r: r["library"]))
    terminalreporter.section("real-library upgrades")
    terminalreporter.write_line(text)
    (realcode_harness.cache_dir() / "realcode-table.md").write_text(text + "\n")
