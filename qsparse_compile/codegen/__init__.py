"""Kernel code generation: templates rendered per specialisation, compiled, registered as ops.

``qsparse_compile.codegen.cpu`` holds the CPU path (C kernels built with the system compiler and
loaded with ctypes). Subpackages are imported on demand so that importing the compiler never
starts a C compiler or Triton.
"""
