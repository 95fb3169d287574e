"""scripts/bench_metrics.py --rows-vs: two whole checkouts' metric_rows, each in its own worker process."""

import pytest
from conftest import REPO, load_script


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # the script imports benchlib beside it
    return load_script("scripts/bench_metrics.py")


def test_rows_vs_the_committed_tree_gives_the_same_rows_from_two_processes(bench):
    # HEAD's feclip/ (git archive) against this checkout's: the same code on a clean tree, so every
    # row must agree bit for bit; the worker asserts that each imported the feclip it was given
    f = bench.bench_rows_vs("HEAD", n_images=24, size=32, n_categories=3, repeats=1)
    assert f["vs_row_names_equal"] is True
    assert f["vs_rows"] == 8 * 4  # 3 categories + __micro__, 8 metrics each (both AUPROs)
    assert f["vs_differing_rows"] == 0
    assert f["vs_seconds_before"] > 0 and f["vs_seconds_now"] > 0
