"""The run log's progress lines (``idistill_assets.progress``): done / total, the share, the time spent and about
how long is left, from the pace so far; what a person reads to plan around a long step."""

import pytest

from idistill_assets.progress import clock, eta_logger, progress_line


@pytest.mark.parametrize(
    ("seconds", "shown"), [(None, "?"), (0, "0:00"), (59.6, "1:00"), (125, "2:05"), (3600, "1:00:00"), (3725, "1:02:05")]
)
def test_clock_reads_like_a_stopwatch(seconds, shown):
    assert clock(seconds) == shown


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "line"),
    [
        (30, 120, 60.0, "embeddings: committed 30 / 120 new samples (25%), 1:00 elapsed, about 3:00 left"),
        (120, 120, 61.0, "embeddings: committed 120 / 120 new samples (100%), 1:01 elapsed, about 0:00 left"),
        (0, 120, 5.0, "embeddings: committed 0 / 120 new samples (0%), 0:05 elapsed, about ? left"),
    ],
)
def test_a_progress_line_says_done_total_share_and_time_left(done, total, elapsed, line):
    assert progress_line("embeddings: committed", done, total, elapsed, "new samples") == line


def test_the_logger_reports_through_the_given_log():
    lines = []

    class Log:
        def info(self, message):
            lines.append(message)

    report = eta_logger(Log(), "landmark gradients: committed chunk")
    report(1, 4)
    assert len(lines) == 1 and lines[0].startswith("landmark gradients: committed chunk 1 / 4 (25%), 0:00 elapsed")
