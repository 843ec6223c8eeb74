"""Pallas kernel for the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (see ``kernel.py``)."""

from pallas_kernels.linear_scan.kernel import linear_scan_bwd, linear_scan_fwd, linear_scan_pallas

__all__ = ["linear_scan_fwd", "linear_scan_bwd", "linear_scan_pallas"]
