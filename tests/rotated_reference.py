"""The eager reference of a calibrated (rotated) model, for tests of the rotate pass.

For every projection the pass rotates (sparsified by top-K or block, calibrated), the output
is ``sparsify(x Q) (W Q)^T + b``, computed from the module's own weight and the calibration's
``Q``; every other projection is the plain reference (:func:`reference.projection`).
"""

from __future__ import annotations

import contextlib

import torch

from qsparse_compile.config import QSparseConfig
from qsparse_compile.reference import projection
from qsparse_compile.research.calibration import Calibration


@contextlib.contextmanager
def rotated_reference(model: torch.nn.Module, calibration: Calibration,
                      config: QSparseConfig | None = None, **options):
    config = QSparseConfig.from_options(config, **options)
    handles = []

    def hook(path: str):
        plan = config.plan_for(path)
        q = calibration.rotation_for(path)
        rotate = plan.method in ("topk", "block") and q is not None

        def run(module, inputs, output):
            x, weight = inputs[0], module.weight
            if rotate:
                x = x @ q.to(x.dtype)
                weight = (weight.double() @ q.double()).to(weight.dtype)
            return projection(x, weight, module.bias, plan, config)

        return run

    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(hook(path)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
