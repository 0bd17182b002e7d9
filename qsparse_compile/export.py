"""Rewrite the projections of a ``torch.export`` program.

The result is an ordinary ``ExportedProgram`` whose graph calls ``qsparse`` ops: it runs, and it
survives ``torch.export.save`` / ``torch.export.load`` in any process that imports this package
(importing it registers the ops the loader needs).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from .config import QSparseConfig
from .passes import RewrittenProjection, WeightTable, run_passes


def sparsify_exported_with_records(
    ep: torch.export.ExportedProgram, config: QSparseConfig, fuse: bool = True
) -> tuple[torch.export.ExportedProgram, list[RewrittenProjection]]:
    """As :func:`sparsify_exported`, also returning what was done to each projection."""
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"sparsify_exported: expected a torch.export.ExportedProgram, got "
                        f"{type(ep).__name__}")
    with warnings.catch_warnings():
        # copying the program's pytree specs trips a deprecation inside torch itself
        warnings.simplefilter("ignore", FutureWarning)
        ep = copy.deepcopy(ep)
    result = run_passes(ep.graph_module, WeightTable.from_export(ep), config, fuse=fuse)
    return ep, result.records


def sparsify_exported(ep: torch.export.ExportedProgram,
                      config: QSparseConfig | None = None, *, fuse: bool = True,
                      **options: Any) -> torch.export.ExportedProgram:
    """Return a copy of ``ep`` with every projection's input sparsified.

    Options are those of :class:`QSparseConfig` (or pass a config); ``fuse=False`` skips the
    norm fusion and input sharing. Example::

        ep2 = sparsify_exported(torch.export.export(model, (ids,)), sparsity=0.5)
    """
    config = QSparseConfig.from_options(config, **options)
    return sparsify_exported_with_records(ep, config, fuse=fuse)[0]
