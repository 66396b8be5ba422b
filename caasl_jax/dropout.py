"""Dropout whose mask comes from a counter-based hash instead of threefry bits.

`HashDropout` behaves like `flax.linen.Dropout` (inverted dropout: every entry is kept
with probability 1 - rate and scaled by 1 / (1 - rate); masks drawn from the
"dropout" RNG stream; identity when deterministic or rate == 0), but draws its mask
differently: one threefry call gives two 32-bit words (a per-call seed), and each
entry's bits are the murmur3 32-bit finaliser applied twice to its flat index mixed
with the seed (`caasl_jax.hash_random.hash_bits`):

    bits[i] = fmix32(fmix32(i ^ seed0) + seed1),   keep[i] = bits[i] >= rate * 2**32

Why: `nn.Dropout` asks threefry for 32 random bits per entry, about 60 integer ops
each, and XLA's CPU backend does not fuse that into the consumer. The policy drops
~6M entries (attention weights and residuals) per forward pass of a 4-history
micro-batch. With `nn.Dropout` that forward pass took 58 ms and its gradient 126 ms;
with this hash 15 ms and 89 ms (about no dropout's cost) on the 2-core CI VM
(`python -m benchmarks.encoder_profile`, "encoder_policy", at 8bcd26b vs 71e438a).
The hash is a dozen integer ops that fuse into the elementwise pass around it. fmix32
is a bijection with full avalanche, so masks are uncorrelated across entries and
across calls (tests/test_dropout.py checks the keep rate, the scaling and the independence).

The mask is applied as a multiply by (keep ? 1 / (1 - rate) : 0), not as
`where(keep, x / (1 - rate), 0)`: XLA's CPU backend fed that `where`'s zeros to an
XNNPACK fusion as a materialised constant as big as the attention weights
([4, 10, 8, 60, 60] per micro-batch; 2.1-2.3 ms to write per sample-axis block in
two runs of `python -m benchmarks.encoder_profile --kernels 12`). The policy encoder's gradient
went from 105-115 ms to 93 ms per 4 histories, the cost without dropout (2026-11-29,
`encoder_profile`, "encoder_policy", before and after this change).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from caasl_jax.hash_random import hash_bits


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """bool[shape]: True with probability 1 - rate (rate rounded to a multiple of 2**-32)."""
    return hash_bits(key, shape) >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


class HashDropout(nn.Module):
    """Inverted dropout with `keep_mask` masks; a drop-in for `nn.Dropout(rate)`."""

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        self._check_rate()
        if deterministic or self.rate == 0.0:
            return x
        return x * self.keep_scale(x.shape, x.dtype)

    def keep_scale(self, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        """dtype[shape]: the multiplier dropout applies, (keep ? 1 / (1 - rate) : 0), with a
        fresh mask from the "dropout" RNG stream. For callers that fold the multiplier
        into their own computation (`SelfAttention` scales unnormalised weights)."""
        self._check_rate()
        keep = keep_mask(self.make_rng("dropout"), shape, self.rate)
        return jnp.where(keep, 1.0 / (1.0 - self.rate), 0.0).astype(dtype)

    def _check_rate(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"HashDropout: rate must be in [0, 1), got {self.rate!r}")
