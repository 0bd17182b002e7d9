"""The measured cost model of the CPU decode op, and the thread policy of its kernel."""

from __future__ import annotations

import os

import pytest
import torch

from qsparse_compile.codegen.cpu import cost_model, machine, thread_policy


class _Probe:
    """A load probe with a fixed answer (the real one reads /proc: another test process on
    the same machine would make it busy)."""

    busy = 0.0

    def others_busy_cpus(self) -> float:
        return self.busy

    def quiet(self) -> bool:
        return self.busy < machine.QUIET_BELOW_CPUS


@pytest.fixture
def load(monkeypatch):
    """Set how busy other processes keep the machine while something is measured."""
    def set_busy(cpus: float) -> None:
        monkeypatch.setattr(_Probe, "busy", cpus)

    monkeypatch.setattr(cost_model, "LoadProbe", _Probe)
    monkeypatch.setattr(thread_policy, "LoadProbe", _Probe)
    set_busy(0.0)
    return set_busy


def test_cost_model_measures_and_caches(tmp_path, monkeypatch, load):
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path))
    cost_model.clear_cache()
    cal = cost_model.calibrate(64, 96, 1, torch.float32, repeats=3)
    assert cal.dense_ms > 0 and all(t > 0 for t in cal.sparse_ms)
    assert isinstance(cost_model.choose_sparse(64, 96, 1, torch.float32, 0.5), bool)
    assert list((tmp_path / "cpu" / "cost_model").glob("*.json"))

    # a new process (empty memory cache) reads the disk instead of measuring again
    cost_model.clear_cache()

    def no_measure(*args, **kwargs):
        raise AssertionError("calibration was repeated instead of read from disk")

    monkeypatch.setattr(cost_model, "_measure", no_measure)
    assert cost_model.calibrate(64, 96, 1, torch.float32) == cal
    cost_model.clear_cache()


def _calibrations_stored(tmp_path) -> list[str]:
    """The calibrations on disk (the thread policy may store its own measurement beside them,
    when it is first asked in this process)."""
    return [p.name for p in (tmp_path / "cpu" / "cost_model").glob("*.json")
            if not p.name.startswith("threads_")]


@pytest.mark.parametrize("fmt", ["int8", "int4", "ternary"])
def test_cost_model_times_the_packed_kernel_per_format(tmp_path, monkeypatch, fmt, load):
    """A weight format is a calibration of its own: the packed kernel against the same
    fallback, cached under its own key."""
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path))
    cost_model.clear_cache()
    cal = cost_model.calibrate(64, 96, 2, torch.float32, repeats=3, fmt=fmt)
    assert cal.kernel == f"packed_linear_{fmt}"
    assert cal.dense_ms > 0 and all(t > 0 for t in cal.sparse_ms)
    plain = cost_model.calibrate(64, 96, 2, torch.float32, repeats=3)
    assert plain.kernel == "topk_linear"
    assert len(_calibrations_stored(tmp_path)) == 2
    assert isinstance(cost_model.choose_sparse(64, 96, 2, torch.float32, 0.5, fmt=fmt), bool)
    cost_model.clear_cache()


def test_cost_model_prediction_and_errors():
    cal = cost_model.Calibration(4096, 4096, 1, "float32", 2, dense_ms=4.0, sparse_ms=(1.0, 3.0))
    assert cal.kernel == "topk_linear"
    assert cal.predict_sparse_ms(0.5) == pytest.approx(2.0)
    assert cal.speedup(0.5) == pytest.approx(2.0)
    assert cost_model.rows_read_fraction(0.5, 1) == 0.5
    assert cost_model.rows_read_fraction(0.5, 2) == 0.75
    with pytest.raises(ValueError, match=r"density must be a number in \[0, 1\].*1.5"):
        cost_model.choose_sparse(64, 64, 1, torch.float32, 1.5)
    with pytest.raises(TypeError, match="float16"):
        cost_model.calibrate(64, 64, 1, torch.float16)
    with pytest.raises(ValueError, match="tokens must be a positive int, got 0"):
        cost_model.calibrate(64, 64, 0, torch.float32)
    with pytest.raises(ValueError, match="at most 8 rows"):
        cost_model.calibrate(64, 64, 9, torch.float32)
    assert cost_model.choose_sparse(64, 64, 9, torch.float32, 0.5) is False


def test_thread_policy_asks_the_kernel_once_per_thread_count(tmp_path, monkeypatch, load):
    """The policy times nothing itself: the kernel module passes its measurement."""
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(thread_policy, "_DECIDED", {})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    asked = []

    def gain(threads):
        asked.append(threads)
        return 1.5

    assert thread_policy.kernel_threads(gain) == 2
    assert thread_policy.kernel_threads(gain) == 2 and asked == [2]
    monkeypatch.setattr(thread_policy, "_DECIDED", {})
    assert thread_policy.kernel_threads(lambda t: 0.5) == 2  # read back from disk
    monkeypatch.setattr(thread_policy, "_DECIDED", {})
    monkeypatch.setenv("QSPARSE_CPU_THREADS", "1")
    assert thread_policy.kernel_threads(gain) == 1


def test_busy_measurements_are_not_stored(tmp_path, monkeypatch, load):
    """What was timed while other processes kept the CPUs busy decides for this process only:
    the next one measures again."""
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path))
    cost_model.clear_cache()
    load(1.5)
    cal = cost_model.calibrate(64, 96, 1, torch.float32, repeats=3)
    assert cost_model.calibrate(64, 96, 1, torch.float32) is cal  # this process: memory
    assert not list((tmp_path / "cpu" / "cost_model").glob("*.json"))
    cost_model.clear_cache()
    load(0.0)
    cost_model.calibrate(64, 96, 1, torch.float32, repeats=3)
    assert len(list((tmp_path / "cpu" / "cost_model").glob("*.json"))) == 1
    cost_model.clear_cache()

    monkeypatch.setattr(thread_policy, "_DECIDED", {})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    load(1.5)
    assert thread_policy.kernel_threads(lambda t: 0.5) == 1
    monkeypatch.setattr(thread_policy, "_DECIDED", {})
    load(0.0)
    assert thread_policy.kernel_threads(lambda t: 1.5) == 2  # measured again, not read back


def test_cost_model_dense_times_the_kernel_against_mm(tmp_path, monkeypatch, load):
    """``dense=True``: the kernel keeping every feature against a bare ``torch.mm``, cached
    under its own key; only fp32/bf16 weights."""
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path))
    cost_model.clear_cache()
    cal = cost_model.calibrate(64, 96, 2, torch.float32, repeats=3, dense=True)
    assert cal.fallback == "mm" and cal.densities == (0.5, 1.0)
    assert cal.dense_ms > 0 and all(t > 0 for t in cal.sparse_ms)
    assert cal.predict_sparse_ms(1.0) == pytest.approx(cal.sparse_ms[1])
    plain = cost_model.calibrate(64, 96, 2, torch.float32, repeats=3)
    assert plain.fallback == "sparsify_addmm"
    assert len(_calibrations_stored(tmp_path)) == 2
    assert isinstance(cost_model.choose_dense(64, 96, 2, torch.float32), bool)
    assert cost_model.choose_dense(64, 96, 9, torch.float32) is False
    with pytest.raises(ValueError, match="dense=True times fp32/bf16 weights, got fmt='int8'"):
        cost_model.calibrate(64, 96, 1, torch.float32, fmt="int8", dense=True)
    cost_model.clear_cache()


def test_load_probe_reads_the_machine():
    probe = machine.LoadProbe()
    busy = probe.others_busy_cpus()
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
    assert isinstance(probe.quiet(), bool)
