"""``compile_model``: compile a model in place with the ``qsparse`` backend, options checked
first.

``torch.compile(model, backend="qsparse", options=...)`` returns a wrapper whose call runs the
compiled graphs, but whose other methods are the model's own: ``compiled.generate(...)`` runs
the *uncompiled* model (dense), because ``generate`` is looked up on the model and calls it
directly. ``model.compile(...)`` (``nn.Module.compile``) compiles the model itself, so every
call of it, ``generate``'s included, runs sparse. :func:`compile_model` is that, plus two
checks that ``torch.compile`` cannot make before the first call:

* the options are validated at once (an unknown option or a bad value raises ``ValueError``
  or ``TypeError`` here; inside a compiled call Dynamo would wrap it in its own exception);
* every override and exclusion glob is matched against the model's projections; one that
  matches none warns, naming the nearest paths (``strict=True``: raises ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .backend import Backend
from .config import QSparseConfig
from .glob_check import check_globs
from .modules import all_projections
from .options import CompileOptions

__all__ = ["compile_model"]


def compile_model(model: torch.nn.Module,
                  options: CompileOptions | QSparseConfig | Mapping[str, Any] | None = None,
                  *, dynamic: bool | None = None, fullgraph: bool = False,
                  **more: Any) -> Backend:
    """Compile ``model`` in place with the ``qsparse`` backend; return the :class:`Backend`.

    ``options`` (and keyword options in ``more``) are those of ``backend="qsparse"``;
    ``dynamic`` and ``fullgraph`` go to ``torch.compile``. Afterwards ``model(...)`` and
    ``model.generate(...)`` run the sparse model, and ``qsparse_compile.report(backend)``
    shows what was compiled::

        backend = qsparse_compile.compile_model(model, sparsity=0.5)
        tokens = model.generate(ids, max_new_tokens=32)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile_model: expected an nn.Module, got {type(model).__name__}")
    backend = Backend(options, **more)
    check_globs(backend.options.config, [p.path for p in all_projections(model)],
                where=f"compile_model({type(model).__name__})")
    backend.check_globs = False  # checked here, against the whole model: once is enough
    model.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    return backend
