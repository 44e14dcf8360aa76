"""Triton kernels, one file per op: @triton.jit kernels and plain launchers, no autograd.

Each launcher has the name and signature of a gpt1:: op schema (engine/ops.py, SCHEMAS);
engine.ops registers it as that op's CUDA kernel. Specs: engine/reference.py.
"""
