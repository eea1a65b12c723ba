"""Hand-written CPU kernels, called from XLA through its FFI (compiled on first use)."""
