"""The on-disk cache of rendered kernels, rendering itself, and the package's import boundary."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

from triton_cases import DEVICE, randn  # noqa: E402

from qsparse_compile.codegen.triton import cache, gemv_template, row_template  # noqa: E402
from qsparse_compile.codegen.triton.row_kernel import row_config  # noqa: E402

SOURCE = '"""A rendered module."""\n\nVALUE = 41\n'


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path / "here"))
    assert cache.cache_dir() == tmp_path / "here" / "triton"
    monkeypatch.delenv("QSPARSE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "qsparse_compile" / "triton"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_dir() == cache.Path.home() / ".cache" / "qsparse_compile" / "triton"


def test_module_written_once_keyed_by_source_hash(cache_root):
    module = cache.load_module("qs_test_value", SOURCE)
    path = cache.source_path("qs_test_value", SOURCE)
    assert path.parent == cache_root / "triton" and path.name.startswith("qs_test_value-")
    assert path.read_text() == SOURCE and module.VALUE == 41
    assert inspect.getsource(module) == SOURCE  # what Triton's JIT relies on
    assert cache.load_module("qs_test_value", SOURCE) is module
    other = cache.load_module("qs_test_value", SOURCE.replace("41", "42"))
    assert other.VALUE == 42 and cache.source_path("qs_test_value", SOURCE + " ") != path
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def test_damaged_file_is_rewritten(cache_root):
    source = SOURCE.replace("41", "43")
    path = cache.source_path("qs_test_damaged", source)
    path.parent.mkdir(parents=True)
    path.write_text("VALUE = ")  # a truncated file under the right name
    assert cache.load_module("qs_test_damaged", source).VALUE == 43
    assert path.read_text() == source


def test_concurrent_loads_share_one_module(cache_root):
    source = SOURCE.replace("41", "44")
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        cache.load_module("qs_test_threads", source))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(m is results[0] for m in results)


def test_bad_kernel_name_rejected():
    with pytest.raises(ValueError, match="identifier"):
        cache.source_path("../escape", SOURCE)


def test_rendering_is_deterministic_and_specialised():
    cfg = row_config(100, 0, 0, 40)
    spec = row_template.RowSpec("bf16", "bf16", 100, 40, 0, 0, "rms", "bf16", None, 1e-6,
                                True, True, True, False, cfg.chunk, cfg.select, cfg.rows)
    text = row_template.render(spec)
    assert text == row_template.render(spec)
    # the specialisation is baked in as constants
    assert "< 100)" in text and "count >= 40" in text and "1e-06" in text
    assert "tl.sort" not in text
    compile(text, spec.name, "exec")
    other = row_template.render(row_template.RowSpec(
        "bf16", "bf16", 100, 41, 0, 0, "rms", "bf16", None, 1e-6, True, True, True, False,
        cfg.chunk, cfg.select, cfg.rows))
    assert other != text
    g = gemv_template.GemvSpec("fp16", 100, 33, 4, 16, 64, 32, 4, True, 256)
    gtext = gemv_template.render(g)
    assert "reduce_kernel" in gtext and "< 100" in gtext
    compile(gtext, g.name, "exec")


def test_kernels_run_as_the_test_device_needs_and_have_source():
    """On the CPU test device (the conftest's TRITON_INTERPRET=1) the rendered kernels run in the
    interpreter; on CUDA they are compiled ``JITFunction``s. Either way Triton reads their
    source from the cached file."""
    from qsparse_compile.codegen.triton import row_kernel, row_sparsify

    row_sparsify.topk_sparsify(randn(2, 8), 3)
    spec = row_template.RowSpec("fp32", "fp32", 8, 3, 0, 0, "none", None, None, 0.0, False,
                                False, True, False, 8, "bisect", row_config(8, 0, 0, 3).rows)
    kernel = row_kernel._kernel(spec)
    expected = "InterpretedFunction" if DEVICE.type == "cpu" else "JITFunction"
    assert type(kernel).__name__ == expected
    assert "def row_kernel" in inspect.getsource(kernel.fn)


def test_importing_the_package_does_not_import_the_triton_kernels():
    """``import qsparse_compile`` leaves this package (and so any use of Triton) alone.

    (PyTorch itself may import Triton when it is installed, e.g. ``torch._dynamo`` probes it.)
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = """if True:
        import sys, torch, qsparse_compile
        prefixes = ("qsparse_compile.codegen.triton", "qsparse_compile_triton_kernels")
        ours = [m for m in sys.modules if m.startswith(prefixes)]
        assert not ours, ours
        assert not hasattr(torch.ops.qsparse_triton, "topk_sparsify")
    """
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
