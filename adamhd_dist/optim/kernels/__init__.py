"""Fused AdamHD update kernels: ``cpu`` (a JIT-built C++ extension) and ``triton_adamhd`` (GPU)."""
