"""Comparison helpers: exact equality that treats NaN sensibly, and error-message checks."""

from __future__ import annotations

import math
import re

import pytest
import torch

_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and values, bit for bit, NaN matching NaN at the same positions.

    ``torch.equal`` alone fails on any NaN, and ``nan_to_num`` would map +-inf onto the largest
    finite value (hiding an inf/finite disagreement), so the NaN positions are compared first
    and then blanked out with zeros in both tensors.
    """
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.dtype == torch.bool:
        assert torch.equal(actual, expected), _diff(actual, expected)
        return
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    a = torch.where(nan_a, 0, actual)
    e = torch.where(nan_e, 0, expected)
    assert torch.equal(a, e), _diff(a, e)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor (distinguishes -0.0 and NaN payloads)."""
    return t.contiguous().view(_INT_OF_WIDTH[t.element_size()])


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    where = (a != b).nonzero()
    first = tuple(where[0].tolist()) if len(where) else None
    return f"{len(where)} element(s) differ; first at {first}: {a[first]} vs {b[first]}"


def raises_naming(exc: type[Exception], *parts: str):
    """``pytest.raises`` whose message must contain every one of ``parts`` (in any order).

    The contract for bad parameters is a message naming the option, the value given and what is
    allowed; one look-ahead per part checks all of them with a single ``match=``.
    """
    pattern = "(?s)^" + "".join(f"(?=.*{re.escape(p)})" for p in parts)
    return pytest.raises(exc, match=pattern)


def magnitude_rank(value: float, index: int) -> tuple[bool, float, int]:
    """Order of preference for top-K: NaN above all, then larger ``|x|``, then lower index."""
    if math.isnan(value):
        return (True, 0.0, -index)
    return (False, abs(value), -index)


def assert_topk_rows(x: torch.Tensor, mask: torch.Tensor, k: int) -> None:
    """Each row of ``mask`` keeps exactly ``k`` entries, and no dropped entry outranks a kept one.

    Written without sorting: for every row, the weakest kept entry must beat the strongest
    dropped entry under :func:`magnitude_rank` (largest ``|x|``, NaN first, ties to the lower
    index). Values go through Python floats, exact for every supported dtype.
    """
    d = x.shape[-1]
    rows = x.detach().reshape(-1, d).double().tolist()
    keeps = mask.reshape(-1, d).tolist()
    for r, (row, keep) in enumerate(zip(rows, keeps, strict=True)):
        kept = [magnitude_rank(v, i) for i, (v, b) in enumerate(zip(row, keep, strict=True)) if b]
        dropped = [
            magnitude_rank(v, i) for i, (v, b) in enumerate(zip(row, keep, strict=True)) if not b
        ]
        assert len(kept) == k, f"row {r}: kept {len(kept)} entries, expected {k}: {row}"
        if dropped:
            assert min(kept) > max(dropped), f"row {r}: wrong entries kept {keep} for {row}"
