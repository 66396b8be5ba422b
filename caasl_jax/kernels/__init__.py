"""Native kernels that XLA's CPU backend lacks (XLA FFI custom calls, built on first use).

`cpu_attention`: fused multi-head softmax attention for the agents' encoders.
"""
