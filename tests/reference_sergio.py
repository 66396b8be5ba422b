"""Drive avici's own NumPy SERGIO (avici 1.0.7) with caasl_jax's hidden parameters.

Install (gitignored, shared with the reward-model reference tests):

    pip install --no-deps --target .ref avici==1.0.7

Only avici/synthetic/sergio/sim.py is loaded, from its file: it needs NumPy alone,
whereas importing the `avici` package runs its __init__ (Haiku, the removed
`jax.sharding.PositionalSharding`, `pyarrow.plasma`), none of which the simulator uses.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

REF_DIR = Path(os.environ.get("AVICI_REF", Path(__file__).resolve().parents[1] / ".ref"))
SIM_PATH = REF_DIR / "avici" / "synthetic" / "sergio" / "sim.py"


def load_sergio_class():
    """avici's `Sergio` class, or None when the reference is not installed."""
    if not SIM_PATH.exists():
        return None
    spec = importlib.util.spec_from_file_location("_avici_sergio_sim_ref", SIM_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Sergio


def simulate(
    sergio_cls,
    rng: np.random.Generator,
    params,
    env,
    number_sc: int,
    knockout: int | None = None,
    technical_noise: bool = True,
) -> np.ndarray:
    """Cells f32[C * number_sc, d] of avici's simulator for one system of ours.

    `params` is one SergioParams (NumPy leaves): the same graph, interaction
    strengths and basal rates; avici computes its own half-responses (from the
    knocked-out system when `knockout` is set, as avici does). With
    `technical_noise`, avici's outlier / library / dropout / Poisson steps run with
    the platform's settings, the outlier genes and factors being ours so that the
    two data sets share them.
    """
    d, c = env.d, env.n_cell_types
    kout = np.zeros(d, bool)
    if knockout is not None:
        kout[knockout] = True
    sim = sergio_cls(
        rng=rng, number_genes=d, number_bins=c, number_sc=number_sc,
        noise_params=env.noise_scale, noise_type="dpd", decays=env.decay,
        sampling_state=env.sampling_state, kout=kout, dt=env.dt, safety_steps=10,
    )
    sim.custom_graph(
        g=np.asarray(params.graph, np.float64),
        k=np.asarray(params.interactions, np.float64),
        b=np.asarray(params.basal, np.float64).T,
        hill=env.hill * np.ones((d, d)),
    )
    sim.simulate()
    expr = sim.getExpressions()  # [C, d, number_sc]
    if technical_noise:
        noise = env.noise
        expr = expr * np.asarray(params.outlier_factor, np.float64)[None, :, None]
        _, expr = sim.lib_size_effect(expr, noise.library_mean, noise.library_scale)
        expr = expr * sim.dropout_indicator(expr, noise.dropout_shape,
                                            int(noise.dropout_percentile))
        expr = sim.convert_to_UMIcounts(expr)
    return np.concatenate(expr, axis=1).T
