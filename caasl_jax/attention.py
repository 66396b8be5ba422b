"""Softmax attention with a hand-written gradient, shared by the policy, the critics
and the AVICI reward model.

XLA's CPU backend runs batched matmuls of the form [..., M, K] @ [..., K, N] in its fast
YNNPACK kernels. Autodiff's gradient of attention contracts the leading axis of the
left operand (dk = dlogits^T q, dv = w^T g), which it cannot hand to YNNPACK and runs
in its generic dot emitter instead, about 10x slower on 4- or 8-wide heads (see
"Backward attention products" in benchmarks/RESULTS.md). `softmax_attention` computes
the same function with a `jax.custom_vjp` whose products all have the fast form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _attention_forward(q, kt, v, key_mask, drop_scale):
    """Softmax attention: q f32[..., S, C], kt f32[..., C, T], v f32[..., T, C] ->
    (out f32[..., S, C], residuals). key_mask bool broadcastable to [..., S, T] or None
    (False: weight 0); drop_scale f32 broadcastable to [..., S, T] or None (dropout of
    the weights, applied after the softmax)."""
    logits = (q @ kt) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    if key_mask is not None:
        logits = jnp.where(key_mask, logits, jnp.finfo(logits.dtype).min)
    # the division by the row sums comes after the value product, on [..., S, C]
    # rather than on the [..., S, T] weights (dropout commutes with it): on a CPU the
    # S x T passes are memory-bound, and this saves one of them each way
    unnormalized = jnp.exp(logits - logits.max(-1, keepdims=True))
    row_sums = unnormalized.sum(-1, keepdims=True)  # [..., S, 1]
    weighted = unnormalized if drop_scale is None else unnormalized * drop_scale
    out = (weighted @ v) / row_sums
    return out, (q, kt, v, drop_scale, unnormalized, row_sums, out)


@jax.custom_vjp
def softmax_attention(q, kt, v, key_mask=None, drop_scale=None):
    """softmax(q kt / sqrt(C), keys masked) (dropped out) @ v -> f32[..., S, C].

    Shapes as `_attention_forward`; the gradient (module docstring) flows to q, kt and
    v, none to key_mask or drop_scale.
    """
    return _attention_forward(q, kt, v, key_mask, drop_scale)[0]


def _attention_fwd(q, kt, v, key_mask, drop_scale):
    return _attention_forward(q, kt, v, key_mask, drop_scale)


def _attention_bwd(residuals, g):
    q, kt, v, drop_scale, unnormalized, row_sums, out = residuals
    weighted = unnormalized if drop_scale is None else unnormalized * drop_scale

    def t(x):  # a materialised transpose: XLA must not fold it into a product
        barrier = jax.lax.optimization_barrier
        return barrier(jnp.swapaxes(barrier(x), -1, -2))

    g = g / row_sums  # gradient of (weighted @ v), [..., S, C]
    d_row_sums = -jnp.sum(g * out, -1, keepdims=True)  # times 1 / row_sums, [..., S, 1]
    dv = t(t(g) @ weighted)  # [..., C, S] @ [..., S, T] -> [..., T, C]
    d_weighted = g @ t(v)  # [..., S, T]
    d_unnormalized = d_weighted if drop_scale is None else d_weighted * drop_scale
    # exp's derivative; the max shift cancels between numerator and row sums
    d_logits = (d_unnormalized + d_row_sums) * unnormalized / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    dq = d_logits @ t(kt)  # [..., S, T] @ [..., T, C]
    dkt = t(q) @ d_logits  # [..., C, S] @ [..., S, T]
    return dq, dkt, dv, None, None


softmax_attention.defvjp(_attention_fwd, _attention_bwd)
