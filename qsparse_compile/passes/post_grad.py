"""The Triton kernels for training graphs: a post-grad pass for Inductor.

Once AOTAutograd has made the forward and backward graphs, the ``qsparse`` sparsify and mask
nodes in them can call the Triton kernels, which have no autograd of their own
(:mod:`.triton_lowering`). Inductor runs custom passes on exactly those graphs
(``post_grad_custom_post_pass``); the backend gives it this one, for the graphs it compiles
on the Triton path, through ``compile_fx``'s per-call config, never as a process-wide setting.
"""

from __future__ import annotations

import torch.fx

from .triton_lowering import retarget_to_triton

__all__ = ["triton_post_grad_pass"]


def triton_post_grad_pass():
    """An Inductor ``CustomGraphPass`` that retargets a graph's nodes to the Triton kernels.

    Its uuid hashes the files that decide what it does, so Inductor's FX graph cache tells
    graphs compiled with and without it apart.
    """
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    from . import triton_lowering

    class TritonKernels(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            retarget_to_triton(graph)

        def uuid(self) -> bytes:
            return get_hash_for_files((__file__, triton_lowering.__file__))

    return TritonKernels()
