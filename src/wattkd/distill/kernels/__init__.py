"""Triton kernels of the distillation losses (optional: need triton)."""
