"""Triton kernels for the per-batch head objectives (installed as ``mcscale.kernels``)."""
