"""SERGIO single-cell gene-expression design environments (paper section 5.2, B.2, C.2).

A pure, jittable and vmappable re-implementation of the steady-state SERGIO
simulator (Dibaeinia & Sinha 2020) with the knockout / knockdown extension of
Lorch et al. (AVICI) and the technical noise of single-cell RNA sequencing.

The system (hidden params, drawn once per episode by `sample_params`):
- a DAG over d genes; interaction strengths K_ij = ±U(1, 5) on its edges, the sign
  of regulator i positive with probability p_i ~ Beta(0.5, 0.5);
- C = 5 cell types; a master regulator (no parents) has a basal production rate
  U(1, 3) per cell type;
- production of a target j: P_j = sum_i |K_ij| hill_i(x_i), with
  hill_i(x) = x^n / (h_i^n + x^n) for an activator and 1 - that for a repressor;
- the half-response h_i of a regulator is its mean simulated wild-type expression,
  resolved level by level (masters first) in `calibrate`;
- chemical-Langevin dynamics with decay λ and noise scale q, Euler–Maruyama steps
  x <- max(0, x + dt (f P - λ x) + sqrt(dt) q sqrt(f P + λ x) ξ), where f is the
  intervention factor of the gene (1 wild type, 0 knockout, 0.5 knockdown). SERGIO
  writes the noise as sqrt(P) ξ1 + sqrt(λx) ξ2 with two independent normals; that sum
  has the law of sqrt(P + λx) ξ, so one increment per gene and step is drawn;
- technical noise, in order: outlier genes (prob 0.01, expression x LogNormal(3, 1)),
  library size (each cell rescaled to a LogNormal total), dropout (keep with prob
  sigmoid(shape (log(x + 1) - mid))) and Poisson counts; 10X Chromium or Drop-Seq.

What is shared by every cell of an episode, so that the wild-type cells of `reset`
and the interventional cells of `step` measure one and the same system: the graph,
K, basal rates, half-responses, the outlier genes with their factors, and the
dropout mid-point (the q-th percentile of log(x + 1) of the wild-type system after
outlier and library-size effects, computed once in `calibrate`). Fresh per cell:
its cell type (interventional cells: uniform), its trajectory, its snapshot time and
its library size. Differences from avici's NumPy SERGIO, on purpose:
- avici re-simulates the whole system for each knockout, re-estimating the
  half-responses from the knocked-out system and drawing new outlier genes and a new
  dropout mid-point per experiment; here they stay those of the wild type, which is
  what "knocking out a gene of this cell line" means. The effect on the direct
  children of a knocked-out gene is the same either way (hill(0) = 0 whatever h is).
- avici's trajectory length depends on the number of cells of the experiment (15
  steps per cell), so its single-cell knockout experiments are 15-step
  trajectories that barely leave their deterministic start. Here every cell, wild
  type or interventional, is a snapshot at a uniform time of a trajectory of the same
  length S = sampling_state * ceil(n0 / C) (150 for n0 = 50), started, like avici's,
  at the deterministic steady state of the (intervened) system. (avici's genes
  upstream in the graph get 10 extra "safety" steps per level before its sampling
  window, so its clean log-expression spread is about 10 % wider; counts agree.)
- Warm-started cells (`langevin_steps` = K, default 5; None restores one S-step
  trajectory per cell type / design cell with snapshots, the exact scheme above).
  A cell is the snapshot at a uniform step tau of {0..S-1} of a trajectory started at
  the deterministic steady state x0 of the (intervened) system, which is computed
  once per cell type and intervention (d vectorised sweeps of x = f P(x) / λ, exact
  on a DAG). Instead of simulating all tau steps, each cell starts from the
  linear-noise law of the Euler scheme at step tau - min(tau, K) around x0,
  x0 + sqrt(q^2 x0 2λ dt (1 - a^(2k)) / (1 - a^2)) z with a = 1 - λ dt and z a
  standard normal (the variance of each gene with its regulators frozen at x0,
  clipped at 0), then runs the last min(tau, K) nonlinear, coupled Euler–Maruyama
  steps. Deviation: the start ignores the variance a gene inherits from its
  regulators' fluctuations (a child's spread is somewhat narrower than over a full
  trajectory) and the cells of one wild-type data set are independent instead of
  ten snapshots of one trajectory per cell type. A knocked-out gene (x0 = 0,
  P = 0) stays exactly 0. tests/test_sergio.py compares it against K = None and,
  after technical noise, against avici.
- Poisson counts: `poisson_rounds` (default 3) PTRS proposals per count; an entry
  with all rejected (rate >= 10: < 0.4 %) takes the rounded normal approximation.
- Random numbers: the per-cell randomness of `reset` and `step` (cell types, snapshot
  steps, warm starts, increments, dropout, library sizes, Poisson counts) comes from
  `caasl_jax.hash_random.hash_bits` (one threefry call per draw, then a counter
  hash), and a design step makes a single draw for all of it: under vmap each
  threefry call is a loop of small kernels, which had dominated the step's time.
  `sample_params` (the system and its calibration) still uses `jax.random`.
- Increments: `increments="rademacher"` (default) uses ξ = ±1 with probability 1/2,
  the simplified weak Euler scheme (Kloeden & Platen 1992, sec. 14.1): the same weak
  order 1 as Gaussian Euler–Maruyama, so the same cell distributions up to O(dt), at
  1/32 of the random bits; the reference tests compare it against avici.
  `increments="gaussian"` draws standard normals.

A design action is f32[d] in [-1, 1]; gene i is a target iff a_i > 0, for performing
and for recording alike (the public release performed at > 0.5 but recorded > 0).
With `intervention_noise` = p each gene's performed state is flipped with
probability p (a target is not knocked out, or an off-target gene is), while the
history records the intended design. The history holds the counts (dropouts are
zeros); normalisation is left to the reward model.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
from flax import struct
from jax.scipy.special import ndtri

from caasl_jax.envs.core import Environment, ScoreFn, action_targets, validate_common
from caasl_jax.envs.graphs import graph_prior_problem, sample_graph, topological_depth
from caasl_jax.hash_random import hash_bits, split_words

INTERVENTION_KINDS = ("knockout", "knockdown")
INCREMENT_KINDS = ("rademacher", "gaussian")
_TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class TechnicalNoise:
    """Technical-noise settings of one sequencing platform (SERGIO's estimates)."""

    outlier_prob: float
    outlier_mean: float
    outlier_scale: float
    library_mean: float
    library_scale: float
    dropout_shape: float
    dropout_percentile: float


PLATFORMS: dict[str, TechnicalNoise] = {
    "10x": TechnicalNoise(0.01, 3.0, 1.0, 6.0, 0.3, 8.0, 74.0),
    "dropseq": TechnicalNoise(0.01, 3.0, 1.0, 4.4, 0.8, 8.0, 85.0),
}


@struct.dataclass
class SergioParams:
    """Hidden parameters of one gene-regulatory system (C cell types, d genes).

    graph:            f32[d, d]  A[i, j] = 1 means gene i regulates gene j.
    interactions:     f32[d, d]  signed strengths K (zero off the graph).
    basal:            f32[C, d]  basal production per cell type (zero unless master).
    half_response:    f32[d]     mean wild-type expression of each gene.
    outlier_factor:   f32[d]     expression multiplier (1 except for outlier genes).
    dropout_midpoint: f32[]      log(x + 1) mid-point of the dropout logistic.
    """

    graph: jax.Array
    interactions: jax.Array
    basal: jax.Array
    half_response: jax.Array
    outlier_factor: jax.Array
    dropout_midpoint: jax.Array


# --- kinetics --------------------------------------------------------------------------
def hill_activation(x: jax.Array, half_response: jax.Array, hill: float) -> jax.Array:
    """x^n / (h^n + x^n) per regulator; 0 at x = 0. x: f32[..., d], h: f32[d]."""
    if hill == 1.0:
        xn, hn = x, half_response
    else:
        xn, hn = jnp.power(x, hill), jnp.power(half_response, hill)
    return xn / jnp.maximum(hn + xn, _TINY)


def regulation_matrices(interactions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(signed f32[d, d], offset f32[d]) with sum_i |K_ij| hill_ij(a_i) = (a @ signed)_j + offset_j.

    An activator contributes |K| a, a repressor |K| (1 - a) = |K| - |K| a.
    """
    chex.assert_rank(interactions, 2)
    strength = jnp.abs(interactions)
    repress = jnp.where(interactions < 0, strength, 0.0)
    signed = jnp.where(interactions > 0, strength, 0.0) - repress
    return signed, repress.sum(0)


def production_rates(
    x: jax.Array,
    basal: jax.Array,
    regulation: tuple[jax.Array, jax.Array],
    half_response: jax.Array,
    hill: float,
) -> jax.Array:
    """Production P f32[..., d] given regulator levels x f32[..., d].

    P_j = basal_j + sum_i |K_ij| (a_i if K_ij > 0 else 1 - a_i), a = hill_activation(x);
    basal f32[..., d] broadcasts against x (zero for non-master genes); `regulation`
    from `regulation_matrices`.

    The product a @ signed is written out as d scaled rows of `signed` added up. Under
    vmap every environment has its own [d, d] matrix, and XLA's CPU code for that
    batch of [1, d] x [d, d] dots costs ~25 us per call at B = 1,000 (and a
    broadcast-multiply-reduce is slower still), while the sum of rows fuses with the
    Hill activation into one elementwise kernel: a design step went from 2.2 to
    1.85 ms (`benchmarks/sergio_throughput.py`). The unrolled sum grows the program
    linearly in d; measured up to d = 20 (the sergio-dims suite).
    """
    signed, offset = regulation
    activation = hill_activation(x, half_response, hill)
    total = basal + offset
    for i in range(signed.shape[0]):
        total = total + activation[..., i, None] * signed[i]
    return total


def euler_maruyama_step(
    x: jax.Array, production: jax.Array, xi: jax.Array, decay: float, noise: float, dt: float
) -> jax.Array:
    """One chemical-Langevin step, all f32[..., d]; a gene with P = 0 and x = 0 stays 0."""
    drift = production - decay * x
    diffusion = noise * jnp.sqrt(jnp.maximum(production + decay * x, 0.0))
    return jnp.maximum(0.0, x + dt * drift + math.sqrt(dt) * diffusion * xi)


def draw_increments(key: jax.Array, shape: tuple[int, ...], kind: str) -> jax.Array:
    """f32[shape] unit-variance increments: ±1 (kind 'rademacher') or standard normals.

    Drawn flat and reshaped (JAX's counter-based bits are cheaper for a 1-D shape);
    see `increments_from_words`.
    """
    words = jax.random.bits(key, (increment_words(shape, kind),), jnp.uint32)
    return increments_from_words(words, shape, kind)


def increment_words(shape: tuple[int, ...], kind: str) -> int:
    """How many random u32 words `increments_from_words` takes for f32[shape]."""
    n = math.prod(shape)
    return n if kind == "gaussian" else -(-n // 32)


def increments_from_words(words: jax.Array, shape: tuple[int, ...], kind: str) -> jax.Array:
    """f32[shape] increments from random words u32[increment_words(shape, kind)]: 32
    Rademacher signs per word, or one standard normal per word (inverse normal CDF of
    `bits_to_uniform`, so |z| < 5.3)."""
    n = math.prod(shape)
    if kind == "gaussian":
        return ndtri(bits_to_uniform(words)).reshape(shape)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (2.0 * bits.reshape(-1)[:n].astype(jnp.float32) - 1.0).reshape(shape)


def uniform_index(words: jax.Array, size: int) -> jax.Array:
    """i32 uniform on {0..size-1} from random words u32[...], same shape (23 random bits:
    each value's probability is off by less than size / 2^23 of itself)."""
    return jnp.minimum((bits_to_uniform(words) * size).astype(jnp.int32), size - 1)


# --- technical noise ---------------------------------------------------------------------
def library_size_effect(key: jax.Array, x: jax.Array, mean: float, scale: float) -> jax.Array:
    """Rescale each cell (row of x f32[n, d]) to a total of LogNormal(mean, scale)."""
    return rescale_library(x, jax.random.normal(key, x.shape[:-1] + (1,)), mean, scale)


def rescale_library(x: jax.Array, normal: jax.Array, mean: float, scale: float) -> jax.Array:
    """Rescale each cell (row of x f32[n, d]) to a total of exp(mean + scale * normal),
    normal f32[n, 1] standard normal."""
    library = jnp.exp(mean + scale * normal)
    total = x.sum(-1, keepdims=True)
    return x * library / jnp.where(total == 0.0, 1.0, total)


def dropout_midpoint(x: jax.Array, percentile: float) -> jax.Array:
    """f32[]: the percentile of log(x + 1) over all entries of x (NumPy's linear rule)."""
    return jnp.percentile(jnp.log1p(x).reshape(-1), percentile)


def poisson_counts(key: jax.Array, rate: jax.Array, rounds: int = 3) -> jax.Array:
    """f32 Poisson(rate) samples of the same shape as rate f32[...] (`poisson_from_bits`)."""
    words = jax.random.bits(key, (rounds + 1, rate.size), jnp.uint32)
    return poisson_from_bits(words, rate.reshape(-1)).reshape(rate.shape)


def bits_to_uniform(words: jax.Array) -> jax.Array:
    """f32 U(0, 1) of u32 words, same shape: 23 random bits, strictly inside (0, 1)."""
    return ((words >> 9).astype(jnp.float32) + 0.5) * (1.0 / 8388608.0)


def poisson_from_bits(words: jax.Array, rate: jax.Array) -> jax.Array:
    """f32[n] Poisson(rate) samples of rate f32[n] from random words u32[R + 1, n], with a
    fixed amount of work (R PTRS rounds).

    `jax.random.poisson` loops until every entry is accepted (under vmap: the slowest
    entry of the batch) and compiles slowly. Here rates < 10 use inversion over a fixed
    40 terms (`poisson_inversion` of the uniform of words[0]; P(X > 40) < 1e-11 at rate
    10) and rates >= 10 use Hörmann's transformed rejection with squeeze (PTRS, 1993)
    with R independent proposals (`ptrs_proposal` of words[1:]), keeping the first
    accepted one, which is the sequential algorithm's output. PTRS accepts more than
    85 % of proposals, so all R rejected has probability < 0.4 % for R = 3; such an
    entry falls back to the rounded normal approximation, its normal the inverse CDF of
    the words[0] uniform, which a rate >= 10 leaves unused. tests/test_poisson.py checks
    the law against scipy over a grid of rates.

    XLA CPU performance notes: an argmax plus gather over a round axis (run unvectorised)
    made the sampler 4x slower than this loop; the loop's inputs and outputs are buffers,
    so the sampler cannot be fused into a consumer such as the history's stack along a
    minor axis of size 2, which evaluates the fused producer unvectorised for every output
    entry (4x slower again).
    """
    chex.assert_rank(rate, 1)
    chex.assert_shape(words, (None, rate.shape[0]))
    small = rate < 10.0
    u = bits_to_uniform(words[0])
    lam = jnp.where(small, 10.0, rate)
    normal = jnp.maximum(jnp.round(lam + jnp.sqrt(lam) * ndtri(u)), 0.0)
    count = jnp.where(small, poisson_inversion(u, jnp.where(small, rate, 0.0)), normal)

    def propose(i, carry):
        count, done = carry
        proposal, accept = ptrs_proposal(words[i], lam)
        return jnp.where(done | ~accept, count, proposal), done | accept

    count, _ = jax.lax.fori_loop(1, words.shape[0], propose, (count, small))
    return jnp.where(rate > 0, count, 0.0)


def poisson_inversion(u: jax.Array, lam: jax.Array, terms: int = 40) -> jax.Array:
    """Poisson(lam) f32[...] by inversion of uniforms u f32[...]: the number of CDF terms
    P(X <= j), j = 0..terms, below u (so at most `terms`); for lam <= 10 and 40 terms the
    truncation moves less than 1e-11 of probability. One fused, unrolled loop."""

    def add_term(j, carry):
        pmf, cdf, count = carry
        pmf = pmf * lam / j
        cdf = cdf + pmf
        return pmf, cdf, count + (u > cdf)

    pmf0 = jnp.exp(-lam)
    init = (pmf0, pmf0, (u > pmf0).astype(jnp.float32))
    return jax.lax.fori_loop(1, terms + 1, add_term, init, unroll=True)[2]


def ptrs_proposal(word: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One PTRS proposal (Hörmann 1993) for Poisson(lam), lam >= 10, all f32[...]:
    returns (count, accepted bool). The random 32-bit word u32[...] gives 16 bits for u
    and 16 for v, both strictly inside (0, 1); for the rates met here (< 1e5)
    consecutive u values move the proposal by less than 1 wherever it can be accepted
    without v <= us."""
    slam, loglam = jnp.sqrt(lam), jnp.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    u = ((word >> 16).astype(jnp.float32) + 0.5) / 65536.0 - 0.5
    v = ((word & 0xFFFF).astype(jnp.float32) + 0.5) / 65536.0
    us = 0.5 - jnp.abs(u)
    k = jnp.floor((2.0 * a / us + b) * u + lam + 0.43)
    quick = (us >= 0.07) & (v <= v_r)
    rejected = (k < 0) | ((us < 0.013) & (v > us))
    log_accept = jnp.log(v) + jnp.log(inv_alpha) - jnp.log(a / (us * us) + b)
    log_target = -lam + k * loglam - log_factorial(k)
    return k, quick | (~rejected & (log_accept <= log_target))


def log_factorial(k: jax.Array) -> jax.Array:
    """log k! for whole k >= 0 (f32): Stirling's series at w = max(k + 1, 7) with two
    terms (relative error < 1e-6, that of f32), shifted down by log((k+1)...(k+6)) for
    k < 6. About 3x cheaper than `lax.lgamma` on CPU."""
    z = k + 1.0
    small = z < 7.0
    shift = jnp.ones_like(z)
    for i in range(6):
        shift = shift * jnp.where(small, z + i, 1.0)
    w = jnp.where(small, z + 6.0, z)
    r = 1.0 / w
    stirling = (w - 0.5) * jnp.log(w) - w + 0.5 * math.log(2 * math.pi)
    return stirling + r * (1.0 / 12.0 - r * r / 360.0) - jnp.log(shift)


def measure_word_count(n: int, d: int, poisson_rounds: int) -> int:
    """How many random words `measure_counts` takes for n cells of d genes."""
    return (poisson_rounds + 2) * n * d + n


def measure_counts(
    words: jax.Array,
    clean: jax.Array,
    outlier_factor: jax.Array,
    midpoint: jax.Array,
    platform: TechnicalNoise,
    poisson_rounds: int = 3,
) -> jax.Array:
    """Counts f32[n, d] of clean expression f32[n, d]: outliers, library, dropout, Poisson.

    All the randomness comes from the random words u32[measure_word_count(n, d, R)]:
    per entry one word for the dropout, R + 1 for the Poisson count; one per cell for
    its library size.
    """
    chex.assert_rank(clean, 2)
    n, d = clean.shape
    entry_words, library_words = split_words(words, ((poisson_rounds + 2) * n * d, n))
    entry_words = entry_words.reshape(poisson_rounds + 2, n * d)
    library_normal = ndtri(bits_to_uniform(library_words))
    x = clean * outlier_factor
    x = rescale_library(x, library_normal.reshape(n, 1), platform.library_mean,
                        platform.library_scale)
    keep_prob = jax.nn.sigmoid(platform.dropout_shape * (jnp.log1p(x) - midpoint))
    keep = bits_to_uniform(entry_words[0]) < keep_prob.reshape(-1)
    rate = jnp.where(keep, x.reshape(-1), 0.0)
    return poisson_from_bits(entry_words[1:], rate).reshape(n, d)


# --- the environment -------------------------------------------------------------------------
# settings that must be finite real numbers (checked before the finer checks)
_REAL_FIELDS = (
    "edges_per_node",
    "intervention_noise",
    "sign_beta",
    "hill",
    "decay",
    "noise_scale",
    "dt",
)


@dataclasses.dataclass(frozen=True)
class SergioEnv(Environment):
    """A prior over SERGIO gene-regulatory systems plus a knockout budget (module docstring)."""

    d: int = 10
    n0: int = 50
    budget: int = 10
    samples_per_step: int = 1
    graph_kind: str = "er"
    edges_per_node: float = 3.0
    intervention: str = "knockout"
    intervention_noise: float = 0.0
    platform: str = "10x"
    n_cell_types: int = 5
    basal_range: tuple[float, float] = (1.0, 3.0)
    interaction_range: tuple[float, float] = (1.0, 5.0)
    sign_beta: float = 0.5
    hill: float = 1.0
    decay: float = 0.8
    noise_scale: float = 1.0
    dt: float = 0.01
    sampling_state: int = 15
    increments: str = "rademacher"
    langevin_steps: int | None = 5
    poisson_rounds: int = 3
    score_fn: ScoreFn | None = None

    def __post_init__(self):
        name = type(self).__name__
        validate_common(self, _REAL_FIELDS)
        for field in ("basal_range", "interaction_range"):  # lists from YAML stay hashable
            value = getattr(self, field)
            try:
                low, high = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: {field} must be (low, high), got {value!r}") from None
            object.__setattr__(self, field, (low, high))
        graph_problem = graph_prior_problem(self.graph_kind, self.edges_per_node)
        if graph_problem:
            raise ValueError(f"{name}: {graph_problem}")
        for value, allowed, what in [
            (self.intervention, INTERVENTION_KINDS, "intervention"),
            (self.platform, tuple(PLATFORMS), "platform"),
            (self.increments, INCREMENT_KINDS, "increments"),
        ]:
            if value not in allowed:
                raise ValueError(f"{name}: unknown {what} {value!r}; choose one of {allowed}")
        checks = [
            (
                0.0 <= self.intervention_noise < 1.0,
                f"intervention_noise must be in [0, 1), got {self.intervention_noise}",
            ),
            (
                isinstance(self.n_cell_types, int) and self.n_cell_types >= 1,
                f"n_cell_types must be an integer >= 1, got {self.n_cell_types!r}",
            ),
            (
                isinstance(self.sampling_state, int) and self.sampling_state >= 1,
                f"sampling_state must be an integer >= 1, got {self.sampling_state!r}",
            ),
            (
                0 < self.basal_range[0] <= self.basal_range[1],
                f"basal_range must satisfy 0 < low <= high, got {self.basal_range}",
            ),
            (
                0 < self.interaction_range[0] <= self.interaction_range[1],
                f"interaction_range must satisfy 0 < low <= high, got {self.interaction_range}",
            ),
            (self.sign_beta > 0, f"sign_beta must be > 0, got {self.sign_beta}"),
            (
                self.langevin_steps is None
                or (isinstance(self.langevin_steps, int) and self.langevin_steps >= 1),
                f"langevin_steps must be None or an integer >= 1, got {self.langevin_steps!r}",
            ),
            (
                isinstance(self.poisson_rounds, int) and self.poisson_rounds >= 1,
                f"poisson_rounds must be an integer >= 1, got {self.poisson_rounds!r}",
            ),
            (self.hill > 0, f"hill must be > 0, got {self.hill}"),
            (self.decay > 0, f"decay must be > 0, got {self.decay}"),
            (self.noise_scale >= 0, f"noise_scale must be >= 0, got {self.noise_scale}"),
            (0 < self.dt * self.decay < 1, f"need 0 < dt * decay < 1, got dt={self.dt}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}")

    # --- sizes ---------------------------------------------------------------------------
    @property
    def action_dim(self) -> int:
        return self.d

    @property
    def cells_per_type(self) -> int:
        """Wild-type cells drawn from each cell type's trajectory: ceil(n0 / C)."""
        return -(-self.n0 // self.n_cell_types)

    @property
    def n_steps(self) -> int:
        """S: Euler–Maruyama steps of every trajectory (sampling_state per wild-type cell)."""
        return self.sampling_state * self.cells_per_type

    @property
    def noise(self) -> TechnicalNoise:
        return PLATFORMS[self.platform]

    # --- prior ------------------------------------------------------------------------------
    def sample_params(self, key: jax.Array) -> SergioParams:
        graph_key, system_key = jax.random.split(key)
        graph = sample_graph(graph_key, self.d, self.graph_kind, self.edges_per_node)
        return self.params_for_graph(system_key, graph)

    def params_for_graph(self, key: jax.Array, graph: jax.Array) -> SergioParams:
        """Draw the mechanisms of a given DAG f32[d, d] and calibrate the wild type."""
        chex.assert_shape(graph, (self.d, self.d))
        d, c = self.d, self.n_cell_types
        strength_key, p_key, sign_key, basal_key, outlier_key, calib_key = jax.random.split(key, 6)
        graph = (graph != 0).astype(jnp.float32)
        strength = jax.random.uniform(strength_key, (d, d), minval=self.interaction_range[0],
                                      maxval=self.interaction_range[1])
        positive_prob = _symmetric_beta(p_key, self.sign_beta, (d, 1))
        sign = jnp.where(jax.random.bernoulli(sign_key, positive_prob, (d, d)), 1.0, -1.0)
        interactions = graph * strength * sign
        is_master = graph.sum(0) == 0
        basal = jax.random.uniform(basal_key, (c, d), minval=self.basal_range[0],
                                   maxval=self.basal_range[1]) * is_master
        outlier_factor = self._outlier_factor(outlier_key)
        half_response, midpoint = self.calibrate(calib_key, graph, interactions, basal,
                                                 outlier_factor)
        return SergioParams(
            graph=graph,
            interactions=interactions,
            basal=basal,
            half_response=half_response,
            outlier_factor=outlier_factor,
            dropout_midpoint=midpoint,
        )

    def _outlier_factor(self, key: jax.Array) -> jax.Array:
        """f32[d]: LogNormal(mean, scale) for outlier genes (prob outlier_prob), else 1."""
        pick_key, factor_key = jax.random.split(key)
        noise = self.noise
        is_outlier = jax.random.bernoulli(pick_key, noise.outlier_prob, (self.d,))
        normal = jax.random.normal(factor_key, (self.d,))
        factor = jnp.exp(noise.outlier_mean + noise.outlier_scale * normal)
        return jnp.where(is_outlier, factor, 1.0)

    def calibrate(
        self,
        key: jax.Array,
        graph: jax.Array,
        interactions: jax.Array,
        basal: jax.Array,
        outlier_factor: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Simulate the wild type level by level; return (half_response f32[d], midpoint f32[]).

        One trajectory of S steps per cell type, f32[S, C, d]. Pass p (one per level,
        at most d) simulates every gene driven by the stored trajectories of its regulators
        and keeps the result only for the genes of depth p (longest path from a master),
        whose regulators were all fixed by earlier passes; the genes of depth p start at
        P(per-type mean of their regulators) / λ, as in SERGIO. The increments are drawn
        once and shared by the passes: each gene keeps those of the one pass that fixes
        it, so every gene still gets independent noise.
        """
        d, c, s = self.d, self.n_cell_types, self.n_steps
        noise_key, measure_key = jax.random.split(key)
        xi = draw_increments(noise_key, (s, c, d), self.increments)
        depth = topological_depth(graph)

        regulation = regulation_matrices(interactions)

        def produce(x, half_response):
            return production_rates(x, basal, regulation, half_response, self.hill)

        def level_pass(carry):
            level, trajectory, half_response = carry
            start = produce(trajectory.mean(0), half_response) / self.decay  # [C, d]
            drive = produce(trajectory, half_response)  # [S, C, d]

            def body(x, inputs):
                production, noise = inputs
                nxt = euler_maruyama_step(x, production, noise, self.decay, self.noise_scale,
                                          self.dt)
                return nxt, x

            _, fresh = jax.lax.scan(body, start, (drive, xi))
            trajectory = jnp.where(depth == level, fresh, trajectory)
            return level + 1, trajectory, trajectory.mean((0, 1))

        # as many passes as levels (at most d): fixed shapes, a data-dependent count
        init = (jnp.zeros((), jnp.int32), jnp.zeros((s, c, d), jnp.float32),
                jnp.zeros((d,), jnp.float32))
        _, trajectory, half_response = jax.lax.while_loop(
            lambda carry: carry[0] <= depth.max(), level_pass, init
        )

        # dropout mid-point of this system: SERGIO's percentile over a wild-type data set
        snap_key, library_key = jax.random.split(measure_key)
        snap_words = hash_bits(snap_key, (c * self.cells_per_type,))
        cells = _snapshots(snap_words, trajectory, self.cells_per_type).reshape(-1, d)
        noise = self.noise
        x = library_size_effect(library_key, cells * outlier_factor, noise.library_mean,
                                noise.library_scale)
        return half_response, dropout_midpoint(x, noise.dropout_percentile)

    # --- simulation -------------------------------------------------------------------------
    def steady_state_guess(self, params: SergioParams, basal: jax.Array, factor: jax.Array):
        """Deterministic steady state f32[m, d] of the system with per-gene production
        factors `factor` f32[d] (1 wild type, 0 knockout, 0.5 knockdown) and per-trajectory
        basal rates f32[m, d]: the fixed point x = f P(x) / λ, exact after d sweeps on a DAG.
        """

        regulation = regulation_matrices(params.interactions)

        def sweep(_, x):
            production = production_rates(x, basal, regulation, params.half_response, self.hill)
            return factor * production / self.decay

        return jax.lax.fori_loop(0, self.d, sweep, jnp.zeros_like(basal))

    def simulate_clean(
        self,
        key: jax.Array,
        params: SergioParams,
        factor: jax.Array,
        cell_types: jax.Array,
        cells_per_trajectory: int,
    ) -> jax.Array:
        """Clean expression f32[m, cells_per_trajectory, d] before technical noise.

        `factor` f32[d] scales each gene's production for all time (0 for a knockout,
        so that gene is exactly 0); `cell_types` i32[m]. With `langevin_steps` = None,
        one trajectory of S steps per entry of `cell_types`, started at the
        deterministic steady state, each cell a snapshot at a uniform random step.
        Otherwise (default) every cell is simulated on its own, as the snapshot of such a
        trajectory, but from a warm start (module docstring: "Warm-started cells").
        """
        count = self.simulation_word_count(cell_types.shape[0], cells_per_trajectory)
        return self.simulate_from_words(hash_bits(key, (count,)), params, factor, cell_types,
                                        cells_per_trajectory)

    def simulation_word_count(self, m: int, cells_per_trajectory: int) -> int:
        """How many random words `simulate_from_words` takes for m trajectories."""
        n = m * cells_per_trajectory
        if self.langevin_steps is None:
            return increment_words((self.n_steps, m, self.d), self.increments) + n
        return n + n * self.d + increment_words((self.langevin_steps, n, self.d), self.increments)

    def simulate_from_words(
        self,
        words: jax.Array,
        params: SergioParams,
        factor: jax.Array,
        cell_types: jax.Array,
        cells_per_trajectory: int,
    ) -> jax.Array:
        """`simulate_clean` with its randomness given as random words
        u32[simulation_word_count(m, cells_per_trajectory)]; returns clean expression
        f32[m, cells_per_trajectory, d]."""
        chex.assert_shape(factor, (self.d,))
        chex.assert_rank(cell_types, 1)
        m = cell_types.shape[0]
        chex.assert_shape(words, (self.simulation_word_count(m, cells_per_trajectory),))
        if self.langevin_steps is None:
            return self._simulate_trajectories(words, params, factor, cell_types,
                                               cells_per_trajectory)
        return self._simulate_warm(words, params, factor, cell_types, cells_per_trajectory)

    def _simulate_warm(self, words, params, factor, cell_types, cells_per_trajectory):
        d, k_steps, s = self.d, self.langevin_steps, self.n_steps
        m = cell_types.shape[0]
        n = m * cells_per_trajectory
        tau_words, start_words, xi_words = split_words(
            words, (n, n * d, increment_words((k_steps, n, d), self.increments)))
        basal = params.basal[cell_types]  # [m, d]
        if m == 1:  # f32[d] states (see `single` below)
            x0 = self.steady_state_guess(params, basal[0], factor)[None]
        else:
            x0 = self.steady_state_guess(params, basal, factor)  # [m, d], shared by its cells
        x0 = jnp.repeat(x0, cells_per_trajectory, axis=0)  # [n, d]
        basal = jnp.repeat(basal, cells_per_trajectory, axis=0)
        # snapshot step tau ~ U{0..S-1}; the last min(tau, K) steps are simulated, the
        # first tau - min(tau, K) replaced by the linear-noise law of x at that step
        tau = uniform_index(tau_words, s).reshape(n, 1)
        simulated = jnp.minimum(tau, k_steps)
        a2 = (1.0 - self.decay * self.dt) ** 2
        var_rate = self.noise_scale**2 * 2.0 * self.decay * self.dt / (1.0 - a2)
        var = var_rate * x0 * (1.0 - a2 ** (tau - simulated).astype(jnp.float32))
        z = ndtri(bits_to_uniform(start_words)).reshape(n, d)
        start = jnp.maximum(0.0, x0 + jnp.sqrt(var) * z)
        xi = increments_from_words(xi_words, (k_steps, n, d), self.increments)
        active = jnp.arange(k_steps)[:, None, None] >= (k_steps - simulated)[None]  # [K, n, 1]
        regulation = regulation_matrices(params.interactions)
        single = n == 1  # f32[d] states: cheaper than [1, d] ones under vmap
        if single:
            basal, start, xi, active = basal[0], start[0], xi[:, 0], active[:, 0]

        def body(x, inputs):
            noise, on = inputs
            production = factor * production_rates(x, basal, regulation, params.half_response,
                                                   self.hill)
            nxt = euler_maruyama_step(x, production, noise, self.decay, self.noise_scale, self.dt)
            return jnp.where(on, nxt, x), None

        cells, _ = jax.lax.scan(body, start, (xi, active))
        return cells.reshape(m, cells_per_trajectory, d)

    def _simulate_trajectories(self, words, params, factor, cell_types, cells_per_trajectory):
        m, s = cell_types.shape[0], self.n_steps
        xi_words, snapshot_words = split_words(
            words, (increment_words((s, m, self.d), self.increments), m * cells_per_trajectory))
        basal = params.basal[cell_types]  # [m, d]
        start = self.steady_state_guess(params, basal, factor)
        xi = increments_from_words(xi_words, (s,) + basal.shape, self.increments)
        regulation = regulation_matrices(params.interactions)
        # A single trajectory (a design step's cell) runs on f32[d] states: cheaper than
        # [1, d] ones under vmap.
        single = m == 1
        if single:
            basal, start, xi = basal[0], start[0], xi[:, 0]

        def body(x, noise):
            production = factor * production_rates(x, basal, regulation, params.half_response,
                                                   self.hill)
            nxt = euler_maruyama_step(x, production, noise, self.decay, self.noise_scale, self.dt)
            return nxt, x

        _, trajectory = jax.lax.scan(body, start, xi)  # [S, m, d] (or [S, d])
        if single:
            trajectory = trajectory[:, None]
        return _snapshots(snapshot_words, trajectory, cells_per_trajectory)

    def production_factor(self, performed: jax.Array) -> jax.Array:
        """f32[d] production multiplier of the performed targets f32[d] (0/1)."""
        per_target = 0.0 if self.intervention == "knockout" else 0.5
        return jnp.where(performed > 0, per_target, 1.0)

    def performed_targets(self, words: jax.Array, intended: jax.Array) -> jax.Array:
        """f32[d] targets actually hit: each gene flipped w.p. intervention_noise, one
        random word u32[d] per gene."""
        if self.intervention_noise == 0.0:
            return intended
        flip = bits_to_uniform(words) < self.intervention_noise
        return jnp.where(flip, 1.0 - intended, intended)

    def wild_type_clean(self, key: jax.Array, params: SergioParams) -> jax.Array:
        """Clean wild-type expression f32[n0, d]: ceil(n0 / C) cells per type, shuffled."""
        sim_key, perm_key = jax.random.split(key)
        types = jnp.arange(self.n_cell_types)
        cells = self.simulate_clean(sim_key, params, jnp.ones((self.d,)), types,
                                    self.cells_per_type).reshape(-1, self.d)
        return jax.random.permutation(perm_key, cells)[: self.n0]

    def design_word_count(self) -> int:
        """How many random words `design_clean` takes."""
        return self.samples_per_step + self.simulation_word_count(self.samples_per_step, 1)

    def design_clean(self, words: jax.Array, params: SergioParams, performed: jax.Array):
        """Clean expression f32[k, d] of k = samples_per_step cells under `performed`,
        from random words u32[design_word_count()] (cell types, then the simulation)."""
        k = self.samples_per_step
        type_words, sim_words = split_words(words, (k, self.simulation_word_count(k, 1)))
        types = uniform_index(type_words, self.n_cell_types)
        cells = self.simulate_from_words(sim_words, params, self.production_factor(performed),
                                         types, 1)
        return cells[:, 0]

    def measure(self, key: jax.Array, params: SergioParams, clean: jax.Array) -> jax.Array:
        """Counts f32[n, d] of clean cells f32[n, d] with this system's technical noise."""
        n, d = clean.shape
        words = hash_bits(key, (measure_word_count(n, d, self.poisson_rounds),))
        return self.measure_from_words(words, params, clean)

    def measure_from_words(self, words: jax.Array, params: SergioParams, clean: jax.Array):
        """`measure` with its randomness given as random words
        u32[measure_word_count(n, d, poisson_rounds)]; counts f32[n, d]."""
        return measure_counts(words, clean, params.outlier_factor, params.dropout_midpoint,
                              self.noise, self.poisson_rounds)

    def _initial_rows(self, key: jax.Array, params: SergioParams) -> jax.Array:
        sim_key, measure_key = jax.random.split(key)
        return self.measure(measure_key, params, self.wild_type_clean(sim_key, params))

    def _design_rows(self, key: jax.Array, action: jax.Array, params: SergioParams):
        """All of a design step's randomness is one `hash_bits` draw: under vmap every
        threefry call (a key split, a draw) is a loop of small kernels, and the five of
        them (six with intervention noise) took ~0.35 ms of a 1.85 ms step at B = 1,000."""
        k, d = self.samples_per_step, self.d
        sizes = (d, self.design_word_count(), measure_word_count(k, d, self.poisson_rounds))
        flip_words, sim_words, measure_words = split_words(hash_bits(key, (sum(sizes),)), sizes)
        intended = action_targets(action, d)
        performed = self.performed_targets(flip_words, intended)
        counts = self.measure_from_words(measure_words, params,
                                         self.design_clean(sim_words, params, performed))
        return counts, jnp.broadcast_to(intended, counts.shape)


def _symmetric_beta(key: jax.Array, concentration: float, shape) -> jax.Array:
    """Beta(c, c) samples; for c = 1/2 (the prior here) exactly, as the arcsine law
    sin^2(pi U / 2), which compiles far faster than the gamma-based sampler."""
    if concentration == 0.5:
        return jnp.sin(0.5 * math.pi * jax.random.uniform(key, shape)) ** 2
    return jax.random.beta(key, concentration, concentration, shape)


def _snapshots(words: jax.Array, trajectory: jax.Array, per_trajectory: int) -> jax.Array:
    """Cells f32[m, per_trajectory, d] at uniform random steps of trajectory f32[S, m, d],
    the steps from random words u32[m * per_trajectory]."""
    s, m, _ = trajectory.shape
    times = uniform_index(words, s).reshape(m, per_trajectory)
    return trajectory[times, jnp.arange(m)[:, None]]


SERGIO_VARIANTS: dict[str, dict] = {
    "": {},
    "ood-graph": {"graph_kind": "sf"},
    "ood-dropseq": {"platform": "dropseq"},
    "ood-knockdown": {"intervention": "knockdown"},
    "ood-noisy": {"intervention_noise": 0.1},
}
