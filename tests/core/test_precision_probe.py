"""The precision probe measures what it says (issue 25), with no timing assertion and no bit-level float check:
the timer is replaced by a spy that runs the timed callable once, records which dtype its GEMMs ran in and
returns a made-up time, so the test sees every timed call, the order, the dtype and the best-of choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idistill_core.models import precision

CPU = torch.device("cpu")


class _Spy:
    """Stands in for ``precision._time_ms``: each call runs ``fn`` once, records the dtypes of the GEMMs it ran
    (every ``@`` and every ``F.linear``, by output dtype) and the torch thread count, and returns the next
    made-up time of the dtype that actually ran."""

    def __init__(self, monkeypatch, fake_ms: dict[torch.dtype, list[float]]):
        self.fake = {k: list(v) for k, v in fake_ms.items()}
        self.calls: list[dict] = []
        self.gemms: list[tuple] = []  # (timed call index or None for untimed, op, input dtypes, output dtype)
        self._current = None
        matmul, linear = torch.Tensor.__matmul__, F.linear

        def counting_matmul(a, b):
            out = matmul(a, b)
            self.gemms.append((self._current, "@", (a.dtype, b.dtype), out.dtype, (tuple(a.shape), tuple(b.shape))))
            return out

        def counting_linear(x, w, b=None):
            out = linear(x, w, b)
            self.gemms.append((self._current, "linear", (x.dtype, w.dtype), out.dtype, (tuple(x.shape), tuple(w.shape))))
            return out

        monkeypatch.setattr(torch.Tensor, "__matmul__", counting_matmul)
        monkeypatch.setattr(F, "linear", counting_linear)
        monkeypatch.setattr(precision, "_time_ms", self)

    def __call__(self, fn, device):
        self._current = len(self.calls)
        out = fn()
        self._current = None
        dtypes = {g[3] for g in self.gemms if g[0] == len(self.calls)}
        assert len(dtypes) == 1, dtypes  # one timed call runs its GEMMs in one dtype
        dtype = dtypes.pop()
        self.calls.append({"dtype": dtype, "threads": torch.get_num_threads(), "out": out, "device": device})
        return self.fake[dtype].pop(0)

    def timed_dtypes(self) -> list[torch.dtype]:
        return [c["dtype"] for c in self.calls]


def test_forward_probe_times_the_mlp_pair_in_each_dtype_interleaved_and_returns_each_dtypes_best(monkeypatch):
    spy = _Spy(monkeypatch, {torch.float32: [3.0, 2.0, 2.5], torch.bfloat16: [1.5, 1.0, 1.2]})
    threads = torch.get_num_threads()
    got = precision.probe_ms(CPU, 32, 64, tokens=16, repeats=3)
    assert got == (2.0, 1.0)  # each dtype's own best, float32 first
    assert spy.timed_dtypes() == [torch.float32, torch.bfloat16] * 3
    # every timed call is (T, H) @ (H, I) then (T, I) @ (I, H), both operands in the timed dtype
    for i, call in enumerate(spy.calls):
        gemms = [g for g in spy.gemms if g[0] == i]
        assert [g[4] for g in gemms] == [((16, 32), (32, 64)), ((16, 64), (64, 32))]
        assert all(g[2] == (call["dtype"], call["dtype"]) for g in gemms)
        assert call["out"].shape == (16, 32) and call["out"].dtype == call["dtype"]
    # one untimed warm-up pair per dtype before the first timing
    warmup = [g[3] for g in spy.gemms if g[0] is None]
    assert warmup == [torch.float32] * 2 + [torch.bfloat16] * 2
    # both dtypes multiply the same matrices: bf16 agrees with fp32 to bf16's precision (no bit-level check)
    fp32_out, bf16_out = spy.calls[0]["out"].double(), spy.calls[1]["out"].double()
    assert (bf16_out - fp32_out).norm() < 0.05 * fp32_out.norm()
    # the CPU probe runs on one thread (per-core kernel speed decides) and gives the thread count back
    assert {c["threads"] for c in spy.calls} == {1} and torch.get_num_threads() == threads


def test_cpu_probe_runs_single_threaded_and_restores_the_callers_threads(monkeypatch):
    spy = _Spy(monkeypatch, {torch.float32: [1.0], torch.bfloat16: [1.0]})
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a caller with more than one thread (the suite runs with OMP_NUM_THREADS=1)
    try:
        precision.probe_ms(CPU, 32, 64, tokens=8, repeats=1)
        assert [c["threads"] for c in spy.calls] == [1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("workload", ["forward", "gradients"])
def test_probe_leaves_the_global_torch_rng_alone(workload, monkeypatch):
    _Spy(monkeypatch, {torch.float32: [1.0, 1.0], torch.bfloat16: [1.0, 1.0]})
    torch.manual_seed(123)
    state = torch.get_rng_state()
    precision.probe_ms(CPU, 32, 64, tokens=8, repeats=2, workload=workload)
    assert torch.equal(torch.get_rng_state(), state)  # its inputs come from its own seeded generators


def test_gradients_probe_times_float32_against_bfloat16_autocast_over_float32_weights(monkeypatch):
    spy = _Spy(monkeypatch, {torch.float32: [2.0, 3.0], torch.bfloat16: [4.0, 5.0]})
    assert precision.probe_ms(CPU, 32, 64, tokens=8, repeats=2, workload="gradients") == (2.0, 4.0)
    assert spy.timed_dtypes() == [torch.float32, torch.bfloat16] * 2
    for i, call in enumerate(spy.calls):
        gemms = [g for g in spy.gemms if g[0] == i and g[1] == "linear"]
        # gate, up and down projections of a gated MLP, weights in nn.Linear (out, in) layout, kept in float32
        assert [g[4] for g in gemms] == [((8, 32), (64, 32)), ((8, 32), (64, 32)), ((8, 64), (32, 64))]
        assert all(g[2][1] == torch.float32 for g in gemms)
        # the input's and down_proj's gradients, float32 like the leaves they belong to
        h_grad, w_grad = call["out"]
        assert h_grad.shape == (8, 32) and w_grad.shape == (32, 64)
        assert h_grad.dtype == w_grad.dtype == torch.float32
    fp32, bf16 = spy.calls[0]["out"], spy.calls[1]["out"]
    for a, b in zip(fp32, bf16, strict=True):
        assert (a - b).norm() < 0.05 * a.norm()  # the same pass, once in bf16 autocast


def test_probe_stops_timing_an_emulated_bfloat16_after_one_call(monkeypatch):
    spy = _Spy(monkeypatch, {torch.float32: [1.0, 1.0, 1.0], torch.bfloat16: [10.0]})  # > 5x: one timing decides
    assert precision.probe_ms(CPU, 32, 64, tokens=8, repeats=3) == (1.0, 10.0)
    assert spy.timed_dtypes() == [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    spy = _Spy(monkeypatch, {torch.float32: [1.0, 1.0, 1.0], torch.bfloat16: [5.5]})  # just over 5x: stop too
    assert precision.probe_ms(CPU, 32, 64, tokens=8, repeats=3) == (1.0, 5.5)
    assert spy.timed_dtypes() == [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    spy = _Spy(monkeypatch, {torch.float32: [1.0, 1.0, 1.0], torch.bfloat16: [5.0, 4.0, 6.0]})  # 5x: keep timing
    assert precision.probe_ms(CPU, 32, 64, tokens=8, repeats=3) == (1.0, 4.0)
    assert spy.timed_dtypes() == [torch.float32, torch.bfloat16] * 3


def test_cpu_timer_is_this_threads_cpu_time_around_exactly_one_call(monkeypatch):
    clock = iter([10.0, 10.25])
    monkeypatch.setattr(precision.time, "thread_time", lambda: next(clock))
    monkeypatch.setattr(precision.time, "perf_counter", lambda: pytest.fail("wall time on a CPU"))
    calls = []
    assert precision._time_ms(lambda: calls.append(1), CPU) == pytest.approx(250.0)
    assert calls == [1]


def test_accelerator_timer_is_wall_time_between_two_synchronisations(monkeypatch):
    events = []
    clock = iter([5.0, 5.002])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    monkeypatch.setattr(precision.time, "perf_counter", lambda: (events.append(("clock", None)), next(clock))[1])
    monkeypatch.setattr(precision.time, "thread_time", lambda: pytest.fail("CPU time on an accelerator"))
    gpu = torch.device("cuda", 0)  # a device object only: nothing runs on it
    got = precision._time_ms(lambda: events.append(("call", None)), gpu)
    assert got == pytest.approx(2.0)
    # queued work is finished before the clock starts and before it stops
    assert events == [("sync", gpu), ("clock", None), ("call", None), ("sync", gpu), ("clock", None)]
