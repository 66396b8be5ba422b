"""Parity with the real AVICI code (avici 1.0.7 + Haiku, installed under .ref/).

Skipped, with the install command as the reason, when the reference install is absent.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference.avici_ref import import_avici, reference_available

pytestmark = pytest.mark.reference

_ok, _reason = reference_available()
if not _ok:
    pytest.skip(_reason, allow_module_level=True)
try:
    avici_model, hk = import_avici()
except Exception as err:  # pragma: no cover - depends on the environment
    pytest.skip(f"avici/haiku present but not importable: {err!r}", allow_module_level=True)

from avici.utils.data_jax import (  # noqa: E402
    jax_standardize_count_simple,
    jax_standardize_default_simple,
)

from caasl_jax.reward.checkpoint import config_from_kwargs, haiku_to_flax  # noqa: E402
from caasl_jax.reward.model import edge_probs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NET_KWARGS = dict(layers=1, dim=24, key_size=6, num_heads=3, widening_factor=2, dropout=0.0,
                  out_dim=10, logit_bias_init=-1.0, cosine_temp_init=0.5)
INF_KWARGS = dict(mask_diag=True, acyclicity=None)


def _reference_model():
    return avici_model.InferenceModel(
        model_class=avici_model.BaseModel, model_kwargs=dict(NET_KWARGS), **INF_KWARGS
    )


def _random_params(model, d, seed):
    """avici's own init, then every leaf perturbed so no parameter is trivial."""
    x = jnp.zeros((5, d, 2))
    params = model.net.init(jax.random.PRNGKey(seed), x, False)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [
        leaf + 0.3 * jax.random.normal(k, leaf.shape)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, leaves)


def _data(seed, n, d, counts, interv):
    rng = np.random.default_rng(seed)
    if counts:
        x = rng.poisson(rng.uniform(0.2, 6.0, size=(1, d)), size=(n, d)).astype(np.float32)
        x[0] = 0.0  # an empty cell
    else:
        x = (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.5).astype(np.float32)
    mask = (rng.uniform(size=(n, d)) < 0.3) if interv else np.zeros((n, d), bool)
    return np.stack([x, mask.astype(np.float32)], -1)


@pytest.fixture(scope="module")
def model():
    return _reference_model()


@pytest.mark.parametrize(
    "n,d,counts,interv",
    [(7, 3, False, False), (30, 6, False, True), (61, 10, True, True), (20, 4, True, False)],
    ids=["real-obs-7x3", "real-interv-30x6", "counts-interv-61x10", "counts-obs-20x4"],
)
def test_edge_probs_match_avici(model, n, d, counts, interv):
    params = _random_params(model, d, seed=n + d)
    data = _data(n * d, n, d, counts, interv)
    standardizer = jax_standardize_count_simple if counts else jax_standardize_default_simple
    ref = np.asarray(model.infer_edge_probs(params, standardizer(jnp.asarray(data))))
    config = config_from_kwargs(
        {"neural_net_kwargs": NET_KWARGS, "inference_model_kwargs": INF_KWARGS},
        "log2_cpm" if counts else "zscore",
    )
    ours = np.asarray(edge_probs(haiku_to_flax(params, config), jnp.asarray(data), None, config))
    assert ref.shape == ours.shape == (d, d)
    assert ref.std() > 1e-3  # the comparison is not between constants
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("counts", [False, True], ids=["real", "counts"])
def test_padded_history_matches_avici_on_valid_rows(model, counts):
    """Our model on a padded [N] history equals avici on the unpadded valid rows."""
    n_valid, n_total, d = 23, 40, 5
    params = _random_params(model, d, seed=3)
    data = _data(11, n_total, d, counts, interv=True)
    standardizer = jax_standardize_count_simple if counts else jax_standardize_default_simple
    ref = np.asarray(model.infer_edge_probs(params, standardizer(jnp.asarray(data[:n_valid]))))
    config = config_from_kwargs({"neural_net_kwargs": NET_KWARGS},
                                "log2_cpm" if counts else "zscore")
    mask = jnp.arange(n_total) < n_valid
    ours = edge_probs(haiku_to_flax(params, config), jnp.asarray(data), mask, config)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)


_LOADER_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("avici", "haiku", "amortibs"):
                raise ImportError(f"blocked: {name}")
            return None
    sys.meta_path.insert(0, Block())
    sys.path = [p for p in sys.path if not p.rstrip("/").endswith(".ref")]
    import numpy as np, jax.numpy as jnp
    from caasl_jax.reward.checkpoint import load_avici_checkpoint
    from caasl_jax.reward.model import edge_probs
    folder, data_path, out_path = sys.argv[1:4]
    data = np.load(data_path)
    out = []
    for std in ("zscore", "log2_cpm"):
        params, config, meta = load_avici_checkpoint(folder, standardization=std)
        out.append([np.asarray(edge_probs(params, jnp.asarray(x), None, config)) for x in data])
    probs = np.asarray(out)
    try:
        import avici  # noqa: F401
        raise SystemExit("avici was importable")
    except ImportError:
        pass
    np.save(out_path, probs)
    print(meta["step"])
    """
)


def _write_avici_checkpoint(folder: Path, model, d: int) -> dict:
    """Write a checkpoint with avici's own CheckpointingUpdater (kwargs.json + pickle)."""
    import optax
    from avici.backbone import CheckpointingUpdater, Updater

    updater = Updater(net_init=model.net.init, loss_fn=None, opt=optax.lamb(1e-4),
                      acyclicity_dual_lr=None, acyclicity_inner_step=None,
                      acyclicity_burnin=None, acyclicity_warmup=None)
    saver = CheckpointingUpdater(
        updater, str(folder), base_str="checkpoint_",
        save_kwargs={"inference_model_kwargs": INF_KWARGS, "neural_net_kwargs": NET_KWARGS},
    )
    state = saver.init(jax.random.PRNGKey(7), jnp.zeros((4, d, 2)))
    state = state._replace(step=1234, params=_random_params(model, d, seed=21))
    saver.checkpoint(state, 1234)
    return state.params


def test_checkpoint_loader_without_avici(tmp_path, model):
    """avici-written checkpoint -> our loader in a process where avici cannot import."""
    d = 6
    params = _write_avici_checkpoint(tmp_path / "ckpt", model, d)
    assert (tmp_path / "ckpt" / "kwargs.json").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pkl")) == ["checkpoint_0001234.pkl"]
    # count data (nonnegative integers) is valid input for both standardisations
    data = np.stack([_data(s, 25, d, True, interv=s % 2 == 0) for s in range(2)])
    ref = np.stack([
        [np.asarray(model.infer_edge_probs(params, std(jnp.asarray(x)))) for x in data]
        for std in (jax_standardize_default_simple, jax_standardize_count_simple)
    ])
    np.save(tmp_path / "data.npy", data)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", _LOADER_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "data.npy"),
         str(tmp_path / "out.npy")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "1234"
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), ref, atol=1e-5, rtol=0)


def test_checkpoint_pickle_really_holds_avici_classes(tmp_path, model):
    """Guards the loader test: the pickle references avici's and optax's classes."""
    _write_avici_checkpoint(tmp_path / "c", model, 4)
    raw = (tmp_path / "c" / "checkpoint_0001234.pkl").read_bytes()
    assert b"avici.backbone" in raw and b"ModelState" in raw and b"optax" in raw
    state = pickle.loads(raw)
    assert type(state).__module__ == "avici.backbone"
    kwargs = json.loads((tmp_path / "c" / "kwargs.json").read_text())
    assert kwargs["neural_net_kwargs"]["dim"] == NET_KWARGS["dim"]
