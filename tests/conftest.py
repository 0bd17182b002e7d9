"""Shared test settings: deterministic seeds and hypothesis profiles sized for a 2-core CPU."""

import os

# The Triton kernel tests run on CPU tensors in Triton's interpreter, which works only if
# TRITON_INTERPRET=1 is set before ``triton.language`` is first imported: its standard library
# functions (``tl.zeros``, ``tl.sum``, ...) are decorated at that moment. ``import
# qsparse_compile`` imports torch._dynamo, which imports Triton where it is installed, and
# every test module imports the package at collection, before the Triton directory's own
# conftest runs; so the variable is set here, first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def fresh_dynamo():
    """A test that compiles starts and ends with empty Dynamo caches and backend records.

    Use with ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``.
    """
    import torch

    from qsparse_compile.backend import reset_records

    torch._dynamo.reset()
    reset_records()
    yield
    torch._dynamo.reset()
