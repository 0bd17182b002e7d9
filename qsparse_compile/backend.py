"""The ``qsparse`` torch.compile backend.

``torch.compile(model, backend="qsparse", options={...})`` works without importing this package:
the backend is registered through the ``torch_dynamo_backends`` entry point. Dynamo hands us
each captured graph; we rewrite its projections, share and fuse (:func:`passes.run_passes`;
``fuse=False`` stops after the rewrite) and pass the result to the inner compiler: Inductor's
``compile_fx`` by default (which runs AOTAutograd, so training works through the ops'
straight-through gradients), or ``inner="eager"`` to run the rewritten graph as it is.

Backend options, given in ``options`` beside the sparsity options:

* ``inner``: ``"inductor"`` (default) or ``"eager"``: the compiler the rewritten graph goes to.
* ``fuse``: ``True`` (default) or ``False``: share one sparsify among projections reading the
  same tensor and fuse norm + sparsify (+ quant) into one op.
* ``decode``: ``True`` (default) or ``False``: for graphs compiled for inference (grad mode
  off) on CPU weights with few rows per call (decode), replace each group of projections that
  read one sparsified tensor (q/k/v, gate/up, o, down) by one ``qsparse::cpu_topk_linear``: the
  selection fused into a CPU sparse GEMV over the group's concatenated, K-major weights,
  prepared once at compile time (:mod:`passes.cpu_decode`). A measured cost model decides per
  group whether it beats the dense product; ``False`` keeps the generic ops.
* ``calibration``: a :class:`~qsparse_compile.Calibration` (or the path of a saved one):
  sparsify each projection's input in the calibration's rotated space (the rotation folded
  into the weights once, at compile time; :mod:`passes.rotate`). Default: no rotation.
* ``kernels``: ``"auto"`` (default) or ``"triton"``: which kernels the graph runs on
  (:mod:`passes.kernel_select`). ``"auto"`` selects the Triton kernels for graphs whose
  projection weights are on CUDA (where CUDA and Triton are available): the ``qsparse``
  sparsify ops, fused norm + sparsify included, get the Triton kernels as their CUDA
  implementations; with grad mode off, each decode-shaped group of projections sharing one
  input (at most 8 rows per call) becomes one Triton sparse GEMV over K-major weights prepared
  once at compile time (:mod:`passes.cuda_decode`, instead of the CPU decode op); projections
  on 2:4-compatible N:M inputs become ``qsparse::block_sparse_linear``, which runs the 2:4
  semi-structured sparse matmul where the GPU takes it (:mod:`passes.block_prefill`). Graphs on
  CPU weights keep the default ops. ``"triton"`` forces that path on any graph; on CPU tensors
  the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` must be set before Triton is
  imported), which is slow and meant for tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx

from .calibration import Calibration, as_calibration
from .config import OPTION_NAMES, QSparseConfig
from .passes import PassResult, RewrittenProjection, WeightTable, run_passes
from .passes.kernel_select import check_kernels

INNER_COMPILERS = ("inductor", "eager")
BACKEND_OPTIONS = ("inner", "fuse", "decode", "calibration", "kernels")

#: The projections rewritten by the most recent graphs compiled in this process, newest last.
#: Read it with :func:`last_compiled`; it is what ``report`` shows for a compiled model.
_LAST_RESULTS: list[PassResult] = []


def split_options(options: QSparseConfig | Mapping[str, Any] | None
                  ) -> tuple[QSparseConfig, str, bool, bool]:
    """Separate backend options (``inner``, ``fuse``, ``decode``) from sparsity options;
    validate all. Returns ``(config, inner, fuse, decode)``."""
    if isinstance(options, QSparseConfig):
        return options, "inductor", True, True
    opts = dict(options or {})
    opts.pop("calibration", None)  # read by calibration_option
    opts.pop("kernels", None)  # read by kernels_option
    unknown = sorted(set(opts) - set(OPTION_NAMES) - set(BACKEND_OPTIONS))
    if unknown:
        # checked here, not by the config, so the allowed list names the backend's options too
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(OPTION_NAMES + BACKEND_OPTIONS)}"
        )
    inner = opts.pop("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise ValueError(
            f"option 'inner': got {inner!r}, allowed: {', '.join(map(repr, INNER_COMPILERS))}"
        )
    fuse = opts.pop("fuse", True)
    if not isinstance(fuse, bool):
        raise TypeError(f"option 'fuse': must be True or False, got {fuse!r}")
    decode = opts.pop("decode", True)
    if not isinstance(decode, bool):
        raise TypeError(f"option 'decode': must be True or False, got {decode!r}")
    return QSparseConfig.from_options(opts), inner, fuse, decode


def calibration_option(options: QSparseConfig | Mapping[str, Any] | None
                       ) -> Calibration | None:
    """The ``calibration`` backend option as a :class:`Calibration` (loaded from its file when
    a path is given), or None when it is absent or None."""
    if not isinstance(options, Mapping) or options.get("calibration") is None:
        return None
    return as_calibration(options["calibration"], "option 'calibration'")


def kernels_option(options: QSparseConfig | Mapping[str, Any] | None) -> str:
    """The validated ``kernels`` backend option: ``"auto"`` (default) or ``"triton"``."""
    if not isinstance(options, Mapping):
        return "auto"
    return check_kernels(options.get("kernels", "auto"))


def qsparse_backend(gm: torch.fx.GraphModule, example_inputs: list,
                    options: QSparseConfig | Mapping[str, Any] | None = None,
                    **kwargs: Any) -> Callable:
    """Dynamo backend: sparsify every projection of ``gm``, then compile it."""
    if kwargs.get("mode") not in (None, "default"):
        raise ValueError(f"backend 'qsparse': mode={kwargs['mode']!r} is not supported; "
                         f"pass settings through options=")
    config, inner, fuse, decode = split_options(options)
    kernels = kernels_option(options)
    result = run_passes(gm, WeightTable.from_dynamo(gm, example_inputs), config, fuse=fuse,
                        decode=decode, calibration=calibration_option(options),
                        kernels=kernels)
    _LAST_RESULTS.append(result)
    del _LAST_RESULTS[:-64]  # keep memory bounded under many recompilations
    if inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def last_compiled(graphs: int = 1) -> list[RewrittenProjection]:
    """Records of the projections in the ``graphs`` most recently compiled graphs."""
    return [r for result in _LAST_RESULTS[-graphs:] for r in result.records]


def last_results(graphs: int = 1) -> list[PassResult]:
    """The pass results (records, shared and fused counts) of recent graphs."""
    return list(_LAST_RESULTS[-graphs:])


def reset_records() -> None:
    """Forget recorded compilations (tests call this between models)."""
    _LAST_RESULTS.clear()
