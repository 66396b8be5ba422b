"""Evaluate per-example networks in micro-batches (why: CPU memory bandwidth).

The encoders' attention over the N samples makes a logits tensor of B x d x heads x N x
N floats (295 MB at B = 256, N = 60, d = 10, 8 heads). Evaluated over a whole batch at
once, every elementwise pass (mask, max, exp, sum, divide, and their gradients) streams
it through main memory, and on a CPU that, not arithmetic, sets the speed and the
peak memory. Evaluating a few examples at a time keeps the working set in cache:
on the 2-core VM, sampling actions for 1,000 paper-size histories took 27 s at once and
4.6 s in chunks of 4 (measured before the heads-first attention layout; compare
`python -m benchmarks.grad_step --microbatch 0` with the default for today's code).

On accelerators big chunks are fastest, but not the whole paper minibatch: unchunked,
the gradient step needs about 0.1 GB of temporaries per history (25 GB at 256, so
400 GB at the paper's 4,096). The default (`None`) therefore resolves to 4 examples
per chunk on CPU and 256 on accelerators. Chunking changes only the order of
floating-point sums, not the result (tested against the unchunked path).

Three forms, for the three ways the project batches networks:
- `map_examples(fn, xs, mb)`: forward pass over an explicit batch (no gradient);
- `vmap_in_chunks(fn, mb)`: the same when the batch comes from an outer `jax.vmap`
  (the environments vmap a per-history policy and reward over B envs);
- `mean_value_and_grad(loss, params, xs, mb)`: gradient of a mean of per-example
  losses, accumulated chunk by chunk (no B-sized activations are ever stored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

#: examples per chunk when the config leaves it to us: CPU (measured best of 1-40;
#: re-checked 2026-12-01 on the paper step, B = 256 over 2 CPU devices: 2 / 4 / 8 took
#: 18.3 / 18.2 / 20.2 s on a slow day of the VM) and accelerators (bounds the step's
#: temporaries to ~25 GB)
CPU_MICROBATCH = 4
ACCELERATOR_MICROBATCH = 256


def resolve(microbatch: int | None) -> int:
    """Examples per chunk: the configured value, else CPU_MICROBATCH on CPU and
    ACCELERATOR_MICROBATCH elsewhere. 0 means no chunking."""
    if microbatch is not None:
        if not isinstance(microbatch, int) or isinstance(microbatch, bool) or microbatch < 0:
            raise ValueError(f"microbatch must be an integer >= 0 or None, got {microbatch!r}")
        return microbatch
    return CPU_MICROBATCH if jax.default_backend() == "cpu" else ACCELERATOR_MICROBATCH


def _batch_size(xs) -> int:
    return jax.tree.leaves(xs)[0].shape[0]


def map_examples(fn: Callable, xs, microbatch: int | None = None):
    """vmap(fn)(xs) over the leading axis of every leaf of xs, `microbatch` at a time."""
    mb = resolve(microbatch)
    if mb == 0 or mb >= _batch_size(xs):
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=mb)


def vmap_in_chunks(fn: Callable, microbatch: int | None = None) -> Callable:
    """fn(*args) whose `jax.vmap` runs in chunks of `microbatch` (forward only).

    The batching rule maps fn in chunks over the arguments that the vmap batches
    (each wholly batched, axis 0); unbatched arguments (parameters) are shared. Not
    differentiable: use it for acting and scoring, not inside a loss.
    """
    mb = resolve(microbatch)
    if mb == 0:
        return fn

    @jax.custom_batching.custom_vmap
    def chunked(*args):
        return fn(*args)

    @chunked.def_vmap
    def _rule(axis_size, in_batched, *args):
        is_batched = [any(jax.tree.leaves(b)) for b in in_batched]
        if any(
            batched and not all(jax.tree.leaves(b)) for batched, b in zip(is_batched, in_batched)
        ):
            raise NotImplementedError("vmap_in_chunks: partly batched pytree argument")

        def one(example):
            rest = iter(example)
            return fn(*(next(rest) if batched else a for a, batched in zip(args, is_batched)))

        out = map_examples(one, tuple(a for a, batched in zip(args, is_batched) if batched), mb)
        return out, jax.tree.map(lambda _: True, out)

    return chunked


def mean_value_and_grad(
    per_example_loss: Callable,
    params,
    xs,
    microbatch: int | None = None,
    axis_name: str | None = None,
) -> tuple[tuple[jax.Array, Any], Any]:
    """((mean loss, per-example aux), grads of the mean loss), chunk by chunk.

    per_example_loss(params, x) -> (loss f32[], aux) for one example x (a slice of xs
    along its leading axis [B]). Gradients are summed over chunks in a lax.scan, so
    memory holds one chunk's activations, never the batch's. Inside `jax.shard_map`
    pass the mesh axis over which xs is split: the sums then vary over it.
    """
    batch = _batch_size(xs)
    mb = resolve(microbatch)

    def batch_loss(p, chunk, weight):
        losses, aux = jax.vmap(per_example_loss, in_axes=(None, 0))(p, chunk)
        return jnp.sum(weight * losses), aux

    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)
    if mb == 0 or mb >= batch:
        (total, aux), grads = grad_fn(params, xs, jnp.ones((batch,)))
        return (total / batch, aux), jax.tree.map(lambda g: g / batch, grads)

    n_chunks = -(-batch // mb)
    pad = n_chunks * mb - batch
    weight = jnp.concatenate([jnp.ones((batch,)), jnp.zeros((pad,))])

    def to_chunks(x):
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
        return x.reshape(n_chunks, mb, *x.shape[1:])

    chunks = jax.tree.map(to_chunks, xs)

    weights = weight.reshape(n_chunks, mb)

    def body(carry, inputs):
        total, grads = carry
        chunk, w = inputs
        (loss, aux), g = grad_fn(params, chunk, w)
        return (total + loss, jax.tree.map(jnp.add, grads, g)), aux

    # The sums start at zero, so the program holds the gradient code once (seeding them
    # with the first chunk's gradient, outside the scan, made the update's program 1.4x
    # larger and slower to compile). Same sums; XLA fuses the single copy differently,
    # so results can move by an ulp (measured on the small default's update).
    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    if axis_name is not None:  # their type must match the body's (varying over the axis)
        zeros = jax.tree.map(lambda z: jax.lax.pcast(z, axis_name, to="varying"), zeros)
    (total, grads), aux = jax.lax.scan(body, zeros, (chunks, weights))
    aux = jax.tree.map(lambda a: a.reshape(n_chunks * mb, *a.shape[2:])[:batch], aux)
    return (total / batch, aux), jax.tree.map(lambda g: g / batch, grads)
