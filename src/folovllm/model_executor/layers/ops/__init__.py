"""Fused Triton kernels for the decoder's memory-bound glue (M4 part 2).

Each kernel replaces several PyTorch ops that would each read and write the
whole activation once; the layers in ``model_executor/layers/`` keep the plain
PyTorch version as ``forward_native`` (the reference the tests compare with).
"""
