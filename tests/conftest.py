"""Shared test settings: deterministic seeds and hypothesis profiles sized for a 2-core CPU."""

import os

import devices

# The kernel tests run where ``QSPARSE_TEST_DEVICE`` says (see ``devices``): on ``cpu`` (the
# default) in Triton's interpreter, which works only if TRITON_INTERPRET=1 is set before
# ``triton.language`` is first imported: its standard library functions (``tl.zeros``,
# ``tl.sum``, ...) are decorated at that moment. ``import qsparse_compile`` imports
# torch._dynamo, which imports Triton where it is installed, and every test module imports the
# package at collection, before the Triton directory's own conftest runs; so the variable is set
# here, first. On ``cuda`` the interpreter is forced off: those runs exist to launch the compiled
# kernels. An invalid value is reported by ``pytest_configure`` below.
try:
    if devices.interpret():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        os.environ["TRITON_INTERPRET"] = "0"
except devices.DeviceChoiceError:
    pass

import inspect  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_configure(config):
    """Refuse an invalid ``QSPARSE_TEST_DEVICE`` (or ``cuda`` without CUDA) before collecting
    anything: a run on the wrong device would pass without checking what it was asked to."""
    try:
        devices.selected_device()
    except devices.DeviceChoiceError as error:
        raise pytest.UsageError(str(error)) from None


@pytest.fixture
def fresh_dynamo():
    """A test that compiles starts and ends with empty Dynamo caches.

    Use with ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``.
    """
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    """Mark ``hf`` every test of a module that builds Hugging Face models (it uses
    ``hf_models`` or ``transformers``): ``make test`` runs those again with the oldest
    transformers the project declares."""
    uses = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        if module not in uses:
            try:
                source = inspect.getsource(module)
            except (OSError, TypeError):
                source = ""
            uses[module] = "hf_models" in source or "transformers" in source
        if uses[module]:
            item.add_marker(pytest.mark.hf)
