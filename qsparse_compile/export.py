"""Rewrite the projections of a ``torch.export`` program.

The program's graph is traced to the same normalised ATen as a Dynamo graph
(:func:`~qsparse_compile.passes.normalise.normalise_exported`), its weights named by the
program's state-dict names, and the same pass manager rewrites it (graph passes only: a
program is rewritten here, not lowered for a device). The result is an ordinary
``ExportedProgram`` whose graph calls ``qsparse`` ops: it runs, and it survives
``torch.export.save`` / ``torch.export.load`` in any process that imports this package
(importing it registers the ops the loader needs).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import QSparseConfig
from .options import CompileOptions
from .passes import GraphResult, PassManager, WeightTable
from .passes.constants import export_constants
from .passes.normalise import normalise_exported, output_specs
from .rotations import Rotations, as_rotations

__all__ = ["sparsify_exported", "sparsify_exported_with_result"]


def sparsify_exported_with_result(
    ep: torch.export.ExportedProgram, config: QSparseConfig, fuse: bool = True,
    calibration: Rotations | Any | str | os.PathLike | None = None,
) -> tuple[torch.export.ExportedProgram, GraphResult]:
    """As :func:`sparsify_exported`, also returning what the passes did (projections and
    rotations: what ``report`` shows)."""
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"sparsify_exported: expected a torch.export.ExportedProgram, got "
                        f"{type(ep).__name__}")
    options = CompileOptions(config, fuse=fuse, decode=False, kernels="aten",
                             calibration=calibration)
    ep = normalise_exported(ep)
    rotations = None if calibration is None else as_rotations(calibration, "calibration")
    # no gradient mode: a program is rewritten here, not trained through (the rotate pass
    # would warn about training the folded weights)
    with torch.no_grad():
        result = PassManager(options, rotations).run(
            ep.graph_module, WeightTable.from_export(ep, values=rotations is not None),
            export_constants(ep), inference=False)
    _rename_outputs(ep)
    return ep, result


def _rename_outputs(ep: torch.export.ExportedProgram) -> None:
    """Point the program's output specs (and its root call signature) at the nodes the
    rewritten graph returns: a projection that is an output was replaced by a new node."""
    specs = ep.graph_signature.output_specs
    renamed = {old.arg.name: new.arg.name
               for old, new in zip(specs, output_specs(ep.graph_module, specs), strict=True)
               if hasattr(old.arg, "name") and old.arg.name != new.arg.name}
    if not renamed:
        return
    specs[:] = output_specs(ep.graph_module, specs)
    for entry in ep.module_call_graph:
        signature = entry.signature
        if signature is None:
            continue
        for arg in signature.outputs:
            if getattr(arg, "name", None) in renamed:
                arg.name = renamed[arg.name]


def sparsify_exported(ep: torch.export.ExportedProgram,
                      config: QSparseConfig | None = None, *, fuse: bool = True,
                      calibration: Rotations | Any | str | os.PathLike | None = None,
                      **options: Any) -> torch.export.ExportedProgram:
    """Return a copy of ``ep`` with every projection's input sparsified.

    Options are those of :class:`QSparseConfig` (or pass a config); ``fuse=False`` skips the
    norm fusion and input sharing. ``calibration`` (a calibration or the path of a saved one)
    sparsifies in its rotated space, the rotations folded into the weights as constants of the
    program (see :mod:`qsparse_compile.passes.rotate`). Example::

        ep2 = sparsify_exported(torch.export.export(model, (ids,)), sparsity=0.5)
    """
    config = QSparseConfig.from_options(config, **options)
    return sparsify_exported_with_result(ep, config, fuse=fuse, calibration=calibration)[0]
