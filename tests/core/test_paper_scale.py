"""Paper scale on a CPU, reduced: Llama-2-7B's real shapes (hidden 4096, intermediate 11008, 32 layers) through the
gradient reducer, both sketches and the sketched second order, with the budgets ``benchmarks/studies/paper_scale.py``
checks at full size (BENCHMARKS.md "Paper scale"). The full ``down_proj`` set lives on the meta device; one real
layer (random weights, a 2,048-token vocabulary) runs in a child process so its peak RSS is its own."""

import pytest

from benchmarks.common import run_child
from benchmarks.studies import paper_scale

GIB = 2**30


def test_the_default_reducer_over_llama2_7b_down_proj_holds_no_per_coordinate_state():
    got = paper_scale.meta_reducer(draw_srht_samples=False)
    assert got["down_proj_tensors"] == 32 and got["coordinates"] == 32 * 4096 * 11008 == 1_442_840_576
    # budget: projector state <= 1 GiB at 1.44B coordinates (a table of buckets and signs was ~17 GB, SRHT's
    # 2^31-padded signs and permutation 24 GiB)
    assert got["default_projector_state_bytes"] <= paper_scale.BUDGETS["projector_state_gib_7b"] * GIB
    assert got["countsketch_state_bytes"] == 0  # 1.44B coordinates: hashed on the fly, nothing cached
    assert got["srht_state_bytes"] == 1376 * 8192 * 8  # one sample of P positions per 2^20-coordinate block
    assert got["reducer_build_s"] < 5  # nothing generated up front


@pytest.fixture(scope="module")
def one_layer():
    return run_child("studies.paper_scale", "one_layer_check", {"vocab": 2048, "tokens": 16, "landmarks": 2})


def test_one_7b_layer_sketches_cost_a_few_nanoseconds_per_coordinate_and_no_table(one_layer):
    assert one_layer["coordinates"] == 4096 * 11008
    assert one_layer["countsketch_state_bytes"] == 0  # 45M coordinates are past the cache budget: hashed per call
    # CPU time of the thread (a loaded machine deschedules, it does not slow the kernels as much): ~5 ns per
    # coordinate for CountSketch and ~15 ns for the block SRHT when the machine is quiet, 12 / 19 ns at load 7;
    # 1.44B coordinates at the budget take 72 s, against minutes for that sample's 7B backward on one core
    ns = one_layer["reduce_cpu_ns_per_coordinate"]
    assert ns["countsketch"] <= 50 and ns["srht"] <= 150, ns


def test_one_7b_layer_second_order_runs_within_its_memory(one_layer):
    assert one_layer["second_order_finite"]
    # the parameters (0.82 GiB) plus a few 45M-float d-vectors and one target's double-backward graph; a dense
    # d x P map (1.4 TB) or a padded 2^26-float copy per vector would not fit this
    assert one_layer["peak_rss_gib"] <= 2 * one_layer["params_gib"] + 1.5, one_layer
    assert one_layer["peak_rss_gib"] - one_layer["rss_after_gradients_gib"] <= 1.5, one_layer
