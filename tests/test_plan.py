"""``plan``: one composition of the semantics, applied by the oracle and by the ``qsparse`` ops.

The same function composes both; on the same input they must agree exactly (the oracle's masks
come from a sort, the ops' from threshold selection), for every method and quantization.
"""

from __future__ import annotations

import pytest
import torch

from qsparse_compile import reference
from qsparse_compile.config import QSparseConfig, topk_count
from qsparse_compile.functional import QSPARSE_OPS
from qsparse_compile.plan import project, resolve_plan, sparsify_input

CONFIGS = {
    "topk": QSparseConfig(sparsity=0.5),
    "topk-l2": QSparseConfig(sparsity=0.3, rescale="l2"),
    "block": QSparseConfig(method="block", block=(2, 4)),
    "relu": QSparseConfig(method="relu"),
    "int8": QSparseConfig(sparsity=0.5, quant="int8"),
    "bitnet": QSparseConfig(sparsity=0.4, quant="bitnet"),
    "bitnet-dense": QSparseConfig(sparsity=0.0, quant="bitnet"),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_oracle_and_ops_agree(config):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8)
    plan = config.plan_for("proj")
    got = project(x, w, b, plan, config, QSPARSE_OPS, 16)
    expected = project(x, w, b, plan, config, reference.REFERENCE_OPS, 16)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(sparsify_input(x, plan, config, QSPARSE_OPS, 16),
                       sparsify_input(x, plan, config, reference.REFERENCE_OPS, 16))


def test_resolve_plan_leaves_misfit_blocks_dense():
    config = QSparseConfig(method="block", block=(16, 32))
    with pytest.warns(UserWarning, match="'a.b': input width 48 is not a multiple of m=32"):
        resolved = resolve_plan("a.b", 48, config)
    assert resolved.plan.dense and resolved.k is None and "multiple" in resolved.note
    assert resolve_plan("a.b", 64, config).k == 32
    with pytest.raises(ValueError, match="strict"):
        resolve_plan("a.b", 48, QSparseConfig(method="block", block=(16, 32), strict=True))
    assert resolve_plan("x", 100, QSparseConfig(sparsity=0.4)).k == topk_count(100, 0.4)
    assert resolve_plan("lm_head", 100, QSparseConfig(sparsity=0.4)).plan.dense
