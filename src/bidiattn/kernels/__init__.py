"""Triton kernels. Imported lazily by :func:`bidiattn.attention`, so importing bidiattn needs no Triton."""
