"""Attention kernels: one entry point (`attention.attention`), a Pallas flash kernel, an XLA reference."""
