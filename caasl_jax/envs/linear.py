"""Linear additive-noise SCM design environments (paper section 5.1, appendices B.1, C.1).

x_j = sum_i W_ij x_i + b_j + s_j(x_pa(j)) · ε_j, over a random DAG, where
- W_ij ~ Normal(±m, 1/sqrt(in-degree(j))) on the edges (random sign of m per weight;
  m = 0 in training, m > 0 for the mechanism-shift OOD prior), b = 0;
- the noise variance σ_j² ~ InvGamma(10, 1) (std ≈ 0.33);
- ε_j is standard Gaussian, or a Gumbel standardised to mean 0 and variance 1 (so
  the Gumbel OOD set changes the noise's shape, not its scale);
- homoskedastic: s_j = σ_j; heteroskedastic: s_j(x) = σ_j · 2·sigmoid(f_j(x_pa)),
  f_j a random Fourier feature function (100 features, squared-exponential kernel),
  so the scale varies in (0, 2σ_j) around σ_j with the parents' values.

A design action is f32[2d] in [-1, 1]: variable i is a target when a_i > 0 (any
subset, none = an observational sample) and its value is a_{d+i} · value_scale; a
do-intervention sets x_i to that value, a shift intervention adds it to x_i's
structural equation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from caasl_jax.envs.core import Environment, ScoreFn, action_targets, validate_common
from caasl_jax.envs.graphs import graph_prior_problem, sample_graph

NOISE_KINDS = ("gaussian", "gumbel")
INTERVENTION_KINDS = ("do", "shift")
# settings that must be finite real numbers (checked before the finer checks)
_REAL_FIELDS = (
    "edges_per_node",
    "weight_mean",
    "value_scale",
    "fourier_length_scale",
    "fourier_output_scale",
    "noise_concentration",
    "noise_rate",
)
# continuous prior settings that may be traced (vmap or jit over them); the others
# decide shapes or Python control flow and must be numbers when the env is built
_TRACEABLE_FIELDS = (
    "weight_mean",
    "value_scale",
    "fourier_length_scale",
    "fourier_output_scale",
    "noise_rate",
)


@struct.dataclass
class FourierNoiseScale:
    """Per-node random Fourier features of the parents.

    omega: f32[d, F, d] frequencies (already divided by the length scale),
    phase: f32[d, F], coef: f32[d, F] (already times output scale · sqrt(2/F)).
    """

    omega: jax.Array
    phase: jax.Array
    coef: jax.Array


@struct.dataclass
class LinearParams:
    """Hidden parameters of one linear SCM.

    graph f32[d, d] (A[i, j] = 1: i -> j), weights f32[d, d] (zero off the graph),
    bias f32[d], noise_std f32[d], fourier: heteroskedastic scale function or None.
    """

    graph: jax.Array
    weights: jax.Array
    bias: jax.Array
    noise_std: jax.Array
    fourier: FourierNoiseScale | None = None


@dataclasses.dataclass(frozen=True)
class LinearSCMEnv(Environment):
    """A prior over linear SCMs plus an intervention budget; see the module docstring."""

    d: int = 10
    n0: int = 50
    budget: int = 10
    samples_per_step: int = 1
    graph_kind: str = "er"
    edges_per_node: float = 3.0
    weight_mean: float = 0.0
    noise: str = "gaussian"
    heteroskedastic: bool = False
    intervention: str = "do"
    value_scale: float = 1.0
    fourier_features: int = 100
    fourier_length_scale: float = 2.0
    fourier_output_scale: float = 2.0
    noise_concentration: float = 10.0
    noise_rate: float = 1.0
    score_fn: ScoreFn | None = None

    def __post_init__(self):
        name = type(self).__name__
        validate_common(self, _REAL_FIELDS, _TRACEABLE_FIELDS)
        graph_problem = graph_prior_problem(self.graph_kind, self.edges_per_node)
        if graph_problem:
            raise ValueError(f"{name}: {graph_problem}")
        for value, allowed, what in [
            (self.noise, NOISE_KINDS, "noise"),
            (self.intervention, INTERVENTION_KINDS, "intervention"),
        ]:
            if value not in allowed:
                raise ValueError(f"{name}: unknown {what} {value!r}; choose one of {allowed}")
        positive = ["value_scale", "noise_concentration", "noise_rate"]
        if self.heteroskedastic:
            positive += ["fourier_features", "fourier_length_scale", "fourier_output_scale"]
        for field in positive:  # NaN and inf fail too: they would only surface as NaN data
            value = getattr(self, field)
            if isinstance(value, jax.Array):  # traced: checked by whoever traces it
                continue
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{name}: {field} must be a finite number > 0, got {value!r}")
        if self.heteroskedastic and not isinstance(self.fourier_features, int):
            raise ValueError(
                f"{name}: fourier_features must be an integer, got {self.fourier_features!r}"
            )

    @property
    def action_dim(self) -> int:
        return 2 * self.d

    # --- prior ---------------------------------------------------------------------
    def sample_params(self, key: jax.Array) -> LinearParams:
        graph_key, weight_key, sign_key, noise_key, fourier_key = jax.random.split(key, 5)
        d = self.d
        graph = sample_graph(graph_key, d, self.graph_kind, self.edges_per_node)
        in_degree = graph.sum(axis=0)
        std = 1.0 / jnp.sqrt(jnp.maximum(in_degree, 1.0))
        sign = jnp.where(jax.random.bernoulli(sign_key, 0.5, (d, d)), 1.0, -1.0)
        weights = graph * (
            sign * self.weight_mean + std[None, :] * jax.random.normal(weight_key, (d, d))
        )
        variance = self.noise_rate / _standard_gamma(noise_key, self.noise_concentration, (d,))
        fourier = self._sample_fourier(fourier_key) if self.heteroskedastic else None
        return LinearParams(
            graph=graph,
            weights=weights,
            bias=jnp.zeros((d,), jnp.float32),
            noise_std=jnp.sqrt(variance),
            fourier=fourier,
        )

    def _sample_fourier(self, key: jax.Array) -> FourierNoiseScale:
        omega_key, phase_key, coef_key = jax.random.split(key, 3)
        d, f = self.d, self.fourier_features
        omega = jax.random.normal(omega_key, (d, f, d)) / self.fourier_length_scale
        phase = jax.random.uniform(phase_key, (d, f), maxval=2 * math.pi)
        coef = jax.random.normal(coef_key, (d, f)) * self.fourier_output_scale * math.sqrt(2.0 / f)
        return FourierNoiseScale(omega=omega, phase=phase, coef=coef)

    # --- simulation ------------------------------------------------------------------
    def _standard_noise(self, key: jax.Array, shape) -> jax.Array:
        if self.noise == "gaussian":
            return jax.random.normal(key, shape)
        euler_gamma = 0.5772156649015329
        return (jax.random.gumbel(key, shape) - euler_gamma) / (math.pi / math.sqrt(6.0))

    def _noise_scale(self, x: jax.Array | None, params: LinearParams) -> jax.Array:
        """f32[n, d] noise scale of each node given the current values x f32[n, d]."""
        if params.fourier is None:
            return params.noise_std
        fourier = params.fourier
        parents_x = x[:, None, :] * params.graph.T[None, :, :]  # [n, d(node), d(parent)]
        proj = jnp.einsum("njp,jfp->njf", parents_x, fourier.omega) + fourier.phase
        f = jnp.einsum("njf,jf->nj", jnp.cos(proj), fourier.coef)
        return params.noise_std * 2.0 * jax.nn.sigmoid(f)

    def simulate(
        self, key: jax.Array, params: LinearParams, targets: jax.Array, values: jax.Array, n: int
    ) -> jax.Array:
        """Draw n samples f32[n, d] under an intervention on `targets` (f32[d], 0/1).

        Ancestral sampling with fixed shapes: d sweeps of x <- f(x) reach the fixed
        point of a DAG of depth < d exactly.
        """
        eps = self._standard_noise(key, (n, self.d))
        is_target = targets > 0
        do = self.intervention == "do"
        # incoming edges of do-targets are cut; their value enters as the exogenous term
        weights = jnp.where(is_target[None, :] & do, 0.0, params.weights)

        def exogenous(x):
            noise = params.bias + self._noise_scale(x, params) * eps
            return jnp.where(is_target, values, noise) if do else noise + is_target * values

        if params.fourier is None and n >= self.d:
            # x = c (I - W)^-1 with c independent of x: one solve beats d sweeps
            return exogenous(None) @ _nilpotent_inverse(weights)

        def sweep(_, x):
            return x @ weights + exogenous(x)

        x0 = jnp.zeros((n, self.d), jnp.float32)
        return jax.lax.fori_loop(0, self.d, sweep, x0, unroll=True)

    def _initial_rows(self, key: jax.Array, params: LinearParams) -> jax.Array:
        none = jnp.zeros((self.d,), jnp.float32)
        return self.simulate(key, params, none, none, self.n0)

    def design(self, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(targets f32[d] 0/1, values f32[d]) of a policy action f32[2d]."""
        return action_targets(action, self.d), action[self.d :] * self.value_scale

    def _design_rows(self, key: jax.Array, action: jax.Array, params: LinearParams):
        targets, values = self.design(action)
        rows = self.simulate(key, params, targets, values, self.samples_per_step)
        return rows, jnp.broadcast_to(targets, rows.shape)


def _standard_gamma(key: jax.Array, concentration: float, shape) -> jax.Array:
    """Gamma(concentration, 1) samples; an exact sum of exponentials when it is an integer."""
    if float(concentration).is_integer() and 1 <= concentration <= 32:
        return jax.random.exponential(key, (*shape, int(concentration))).sum(-1)
    return jax.random.gamma(key, concentration, shape)


def _nilpotent_inverse(weights: jax.Array) -> jax.Array:
    """(I - W)^-1 = I + W + W² + ... for the weights f32[d, d] of a DAG (W^d = 0).

    Computed as prod_k (I + W^(2^k)): log2(d) squarings instead of a solve.
    """
    d = weights.shape[-1]
    eye = jnp.eye(d, dtype=weights.dtype)
    inverse, power = eye + weights, weights
    for _ in range(max(0, (d - 1).bit_length() - 1)):
        power = power @ power
        inverse = inverse @ (eye + power)
    return inverse
