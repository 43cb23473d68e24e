"""Attention kernels: one entry point (`attention.attention`), Pallas flash and an XLA reference."""
