"""Triton kernel tests: every kernel on the device ``QSPARSE_TEST_DEVICE`` names.

``cpu`` (the default): CPU tensors with Triton's interpreter. ``TRITON_INTERPRET=1`` must be in the
environment before any ``@triton.jit`` decorator runs (the decorator reads it), so it is set
here, at the top of the directory's conftest, before anything imports Triton (``tests/conftest.py``
has already set it for the packages it imports). ``cuda``: CUDA tensors and compiled kernels
(``TRITON_INTERPRET=0``); a machine without CUDA is refused with a usage error rather than
silently running something else. Tests build their inputs on ``triton_cases.DEVICE`` (also the
``device`` fixture). Rendered kernels go to a per-session temporary cache directory while this
directory's tests run (``QSPARSE_CACHE_DIR``, restored afterwards so other tests keep theirs).

Without Triton the test modules skip themselves (``pytest.importorskip``) with a reason saying so.
"""

import os

import devices

try:
    os.environ["TRITON_INTERPRET"] = "1" if devices.interpret() else "0"
except devices.DeviceChoiceError:
    pass  # reported as a usage error by pytest_configure

import pytest  # noqa: E402


def _device():
    try:
        return devices.selected_device()
    except devices.DeviceChoiceError as error:
        raise pytest.UsageError(str(error)) from None


@pytest.fixture(scope="session")
def device():
    """The ``torch.device`` the kernel tests run on (``triton_cases.DEVICE``)."""
    return _device()


@pytest.fixture(scope="session")
def _kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qsparse-triton-kernels")


@pytest.fixture(scope="module", autouse=True)
def _isolated_kernel_cache(_kernel_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QSPARSE_CACHE_DIR", str(_kernel_cache))
        yield


def pytest_configure(config):
    _device()  # fail before collection: a wrong device would make every test meaningless
    # The interpreter evaluates NaN/inf arithmetic with numpy, which warns about it; those
    # values are deliberate test inputs.
    for message in ("invalid value encountered", "overflow encountered",
                    "divide by zero encountered"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:RuntimeWarning:triton")
