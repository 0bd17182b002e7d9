"""Triton kernel tests: run every kernel on CPU tensors with Triton's interpreter.

``TRITON_INTERPRET=1`` must be in the environment before any ``@triton.jit`` decorator runs (the
decorator reads it), so it is set here, at the top of the directory's conftest, before anything
imports Triton. Rendered kernels go to a per-session temporary cache directory while this
directory's tests run (``QSPARSE_CACHE_DIR``, restored afterwards so other tests keep theirs).

Without Triton the test modules skip themselves (``pytest.importorskip``) with a reason saying so.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def _kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qsparse-triton-kernels")


@pytest.fixture(scope="module", autouse=True)
def _isolated_kernel_cache(_kernel_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QSPARSE_CACHE_DIR", str(_kernel_cache))
        yield


def pytest_configure(config):
    # The interpreter evaluates NaN/inf arithmetic with numpy, which warns about it; those
    # values are deliberate test inputs.
    for message in ("invalid value encountered", "overflow encountered",
                    "divide by zero encountered"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:RuntimeWarning:triton")
