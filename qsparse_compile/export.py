"""Rewrite the projections of a ``torch.export`` program.

The result is an ordinary ``ExportedProgram`` whose graph calls ``qsparse`` ops: it runs, and it
survives ``torch.export.save`` / ``torch.export.load`` in any process that imports this package
(importing it registers the ops the loader needs).
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch

from .calibration import Calibration, as_calibration
from .config import QSparseConfig
from .passes import RewrittenProjection, WeightTable, run_passes
from .passes.constants import export_constants
from .passes.rotate import RotatedInput


def sparsify_exported_with_records(
    ep: torch.export.ExportedProgram, config: QSparseConfig, fuse: bool = True,
    calibration: Calibration | str | os.PathLike | None = None,
) -> tuple[torch.export.ExportedProgram, list[RewrittenProjection]]:
    """As :func:`sparsify_exported`, also returning what was done to each projection."""
    return _sparsify_exported(ep, config, fuse, calibration)[:2]


def _sparsify_exported(ep: torch.export.ExportedProgram, config: QSparseConfig, fuse: bool,
                       calibration: Calibration | str | os.PathLike | None
                       ) -> tuple[torch.export.ExportedProgram, list[RewrittenProjection],
                                  list[RotatedInput]]:
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"sparsify_exported: expected a torch.export.ExportedProgram, got "
                        f"{type(ep).__name__}")
    with warnings.catch_warnings():
        # copying the program's pytree specs trips a deprecation inside torch itself
        warnings.simplefilter("ignore", FutureWarning)
        ep = copy.deepcopy(ep)
    if calibration is None:
        result = run_passes(ep.graph_module, WeightTable.from_export(ep), config, fuse=fuse)
    else:
        # the rotation folds into the real weights; the decode passes (which would take real
        # weights as graph buffers, which an exported program cannot hold) stay off, as they
        # are for every exported program. No gradient mode: a program is rewritten here, not
        # trained through (the rotate pass would warn about training the folded weights)
        with torch.no_grad():
            result = run_passes(ep.graph_module, WeightTable.from_export(ep, values=True),
                                config, fuse=fuse, decode=False,
                                calibration=as_calibration(calibration, "calibration"),
                                add_constant=export_constants(ep))
    return ep, result.records, result.rotations


def sparsify_exported(ep: torch.export.ExportedProgram,
                      config: QSparseConfig | None = None, *, fuse: bool = True,
                      calibration: Calibration | str | os.PathLike | None = None,
                      **options: Any) -> torch.export.ExportedProgram:
    """Return a copy of ``ep`` with every projection's input sparsified.

    Options are those of :class:`QSparseConfig` (or pass a config); ``fuse=False`` skips the
    norm fusion and input sharing. ``calibration`` (a :class:`Calibration` or the path of a
    saved one) sparsifies in its rotated space, the rotations folded into the weights as
    constants of the program (see :mod:`passes.rotate`). Example::

        ep2 = sparsify_exported(torch.export.export(model, (ids,)), sparsity=0.5)
    """
    config = QSparseConfig.from_options(config, **options)
    return sparsify_exported_with_records(ep, config, fuse=fuse, calibration=calibration)[0]
