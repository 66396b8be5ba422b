"""Loading official AVICI checkpoints, and saving/loading this project's weights.

Official checkpoints (Lorch et al.; e.g. the `neurips-linear` folder of the authors'
release) are a folder with `kwargs.json` and `checkpoint_<step>.pkl`, the pickle of a
`ModelState(step, rng, opt_state, params, dual, dual_penalty_polyak, ave_params)`
whose `params` is a Haiku parameter dict. `load_avici_checkpoint` reads it with a
restricted unpickler that stubs the avici, optax and Haiku classes it meets, so
neither avici nor Haiku is needed, and maps the Haiku names onto our Flax tree
(see `haiku_to_flax`).

Our own weights are one msgpack file (flax.serialization) holding the model config,
the parameters and free-form metadata: `save_weights(path, params, config, meta)`,
`load_weights(path)`, and `load_pretrained(name)` for the files shipped in
`caasl_jax/weights/` (e.g. "linear-d10").
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from flax import serialization

from caasl_jax.files import write_atomically
from caasl_jax.reward.model import AviciConfig, Params, check_params

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
FORMAT = "caasl-jax/avici-weights/v1"


class Pretrained(NamedTuple):
    """params (Flax tree), config (AviciConfig), meta (dict)."""

    params: Params
    config: AviciConfig
    meta: dict


# ---------------------------------------------------------------------------- our weights
def save_weights(path: str | Path, params: Params, config: AviciConfig, meta: dict | None = None):
    """Write params + config + meta to one msgpack file at `path`."""
    check_params(params, config)
    tree = {
        "format": FORMAT,
        "config": config.to_json(),
        "meta": json.dumps(meta or {}, sort_keys=True),
        "params": _to_numpy(params),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tagged_msgpack(path, tree)


def _msgpack_digest(tree: dict) -> str:
    return hashlib.sha256(serialization.msgpack_serialize(tree)).hexdigest()


def write_tagged_msgpack(path: Path, tree: dict) -> Path:
    """Write `tree` (a dict with a "format" tag) as msgpack, atomically, plus a "digest" of its
    contents that `read_tagged_msgpack` checks: bytes changed in place would otherwise
    load as other numbers without any error."""
    data = serialization.msgpack_serialize({**tree, "digest": _msgpack_digest(tree)})
    return write_atomically(path, data)


def read_tagged_msgpack(path: Path, fmt: str, what: str) -> dict:
    """The dict stored in a caasl-jax msgpack file whose "format" tag is `fmt`.

    ValueError "<path>: not a caasl-jax <what> file (...)" for anything else, and
    "<path> is damaged" when its contents differ from its digest (files written before
    digests existed have none and are not checked).
    """
    try:
        tree = serialization.msgpack_restore(Path(path).read_bytes())
    except Exception as err:  # msgpack raises several unrelated types
        raise ValueError(f"{path}: not a caasl-jax {what} file (msgpack: {err})") from None
    if not isinstance(tree, dict) or tree.get("format") != fmt:
        raise ValueError(f"{path}: not a caasl-jax {what} file (missing format tag {fmt!r})")
    digest = tree.pop("digest", None)
    if digest is not None and digest != _msgpack_digest(tree):
        raise ValueError(
            f"{path} is damaged: its contents differ from the digest written with them"
        )
    return tree


def load_weights(path: str | Path) -> Pretrained:
    """Read a file written by `save_weights`; ValueError naming the problem otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a weights file (.msgpack)")
    if not path.is_file():
        raise ValueError(f"{path}: no such weights file")
    tree = read_tagged_msgpack(path, FORMAT, "weights")
    try:
        config = AviciConfig.from_dict(json.loads(tree["config"]))
        params, meta = tree["params"], json.loads(tree["meta"])
        check_params(params, config)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path}: not a caasl-jax weights file (damaged {type(err).__name__}: {err})"
        ) from None
    except ValueError as err:  # a config or parameters that do not fit together
        raise ValueError(f"{path}: {err}") from None
    return Pretrained(params, config, meta)


def available_pretrained() -> list[str]:
    """Names of the weights shipped in caasl_jax/weights/."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.msgpack"))


def load_pretrained(name: str) -> Pretrained:
    """Shipped weights by name, e.g. `params, config, meta = load_pretrained("linear-d10")`."""
    path = WEIGHTS_DIR / f"{name}.msgpack"
    if not path.is_file():
        raise ValueError(
            f"no shipped reward-model weights called {name!r}; available: {available_pretrained()}"
        )
    return load_weights(path)


#: the reward-model name of the exact posterior (reward/exact.py): no weights, exact
#: for the linear ER envs only
EXACT_REWARD = "exact"


def load_reward_model(name_or_path: str | Path, env=None):
    """(params, config) of shipped weights by name or of a weights file: an AviciConfig.

    The name "exact" (EXACT_REWARD) is the exact posterior of `env`'s own prior: ({}, its
    ExactPrior), ValueError when env is missing or outside the priors it is exact for.
    """
    if str(name_or_path) == EXACT_REWARD:
        from caasl_jax.reward.exact import ExactPrior

        if env is None:
            raise ValueError("reward model 'exact' is the posterior of an env's prior: pass env")
        try:
            return {}, ExactPrior.of_env(env)
        except ValueError as err:
            raise ValueError(f"reward model 'exact': {err}") from None
    if Path(name_or_path).exists():
        loaded = load_weights(name_or_path)
    elif name_or_path in available_pretrained():
        loaded = load_pretrained(str(name_or_path))
    else:
        raise ValueError(
            f"unknown reward model {str(name_or_path)!r}: not a path, not 'exact', and not "
            f"one of the shipped weights {available_pretrained()}"
        )
    return loaded.params, loaded.config


def _to_numpy(tree):
    """Nested plain dicts of numpy arrays (FrozenDicts and other mappings included)."""
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


# ------------------------------------------------------------------- official checkpoints
class _Record(tuple):
    """Stand-in for pickled NamedTuples and plain objects of classes we do not import."""

    _fields: tuple[str, ...] = ()

    def __new__(cls, *args, **kwargs):
        return tuple.__new__(cls, args)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            self.__dict__.update(state[1] or {})
            self.__dict__.update(state[0] or {})

    def __getattr__(self, name):
        fields = type(self)._fields
        if name in fields and fields.index(name) < len(self):
            return self[fields.index(name)]
        raise AttributeError(name)


_MODEL_STATE_FIELDS = (
    "step",
    "rng",
    "opt_state",
    "params",
    "dual",
    "dual_penalty_polyak",
    "ave_params",
)
_STUB_CACHE: dict[tuple[str, str], type] = {}


def _stub(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUB_CACHE:
        fields = _MODEL_STATE_FIELDS if name == "ModelState" else ()
        _STUB_CACHE[key] = type(name, (_Record,), {"__module__": module, "_fields": fields})
    return _STUB_CACHE[key]


def _as_dict(mapping=(), *args, **kwargs):
    return dict(mapping, *args, **kwargs)


def _reconstruct_jax_array(fun, args, arr_state, aval_state=None):
    """jax arrays pickle as (numpy reconstruction, state): keep the numpy array."""
    arr = fun(*args)
    arr.__setstate__(arr_state)
    return arr


_STUB_MODULES = ("avici", "amortibs", "optax", "chex")
_SAFE_BUILTINS = {
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "int",
    "float",
    "complex",
    "bool",
    "str",
    "bytes",
    "bytearray",
    "slice",
    "range",
    "object",
}


#: what pickled numpy arrays, dtypes and scalars reference (numpy 1 and 2 module names);
#: nothing else of numpy: some of its functions run code (numpy.testing's `runstring`)
_NUMPY_NAMES = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *(
        (f"numpy.{core}.{module}", name)
        for core in ("core", "_core")
        for module, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    ),
}


class _CheckpointUnpickler(pickle.Unpickler):
    """Resolves only numpy's array/dtype/scalar constructors, a few builtins, and stubs
    for avici / optax / Haiku classes; refuses everything else."""

    def find_class(self, module: str, name: str):
        root = module.split(".")[0]
        if (module, name) in _NUMPY_NAMES or (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if module == "_codecs" and name == "encode":
            return super().find_class(module, name)
        if root == "haiku" and name in ("FlatMapping", "FlatMap", "frozendict"):
            return _as_dict
        if root in ("jax", "jaxlib") and name == "_reconstruct_array":
            return _reconstruct_jax_array
        if root in _STUB_MODULES or root == "haiku":
            return _stub(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_avici_pickle(path: str | Path) -> Any:
    """Unpickle an avici `checkpoint_*.pkl` without avici/Haiku; returns the state record."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _CheckpointUnpickler(io.BufferedReader(f)).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        ImportError,
        IndexError,
        TypeError,
        ValueError,
    ) as err:
        raise ValueError(
            f"{path}: not an AVICI checkpoint pickle ({type(err).__name__}: {err})"
        ) from None


def _state_params(state: Any, path: Path) -> dict:
    params = None
    if isinstance(state, _Record) and type(state).__name__ == "ModelState":
        params = getattr(state, "params", None)
    elif isinstance(state, dict) and "params" in state:
        params = state["params"]
    if not isinstance(params, dict) or not any(k.startswith("BaseModel") for k in params):
        raise ValueError(
            f"{path}: not an AVICI checkpoint (expected a ModelState whose params hold "
            f"'BaseModel/...' Haiku modules, got {type(state).__name__})"
        )
    return params


_KWARG_NAMES = {
    "dim": "dim",
    "layers": "layers",
    "num_heads": "heads",
    "key_size": "key_size",
    "widening_factor": "widening",
    "dropout": "dropout",
    "out_dim": "out_dim",
    "cosine_temp_init": "temp_init",
    "logit_bias_init": "bias_init",
}


def config_from_kwargs(kwargs: dict, standardization: str = "zscore") -> AviciConfig:
    """AviciConfig from an avici `kwargs.json` dict (BaseModel defaults where absent)."""
    net = kwargs.get("neural_net_kwargs", kwargs)
    net = net.get("model_kwargs", net)
    inf = kwargs.get("inference_model_kwargs", {})
    values = {
        "dim": 128,
        "layers": 8,
        "heads": 8,
        "key_size": 32,
        "widening": 4,
        "dropout": 0.1,
        "out_dim": None,
        "temp_init": 0.0,
        "bias_init": -3.0,
    }
    for src, dst in _KWARG_NAMES.items():
        if src in net:
            values[dst] = net[src]
    return AviciConfig(
        **values, standardization=standardization, mask_diag=bool(inf.get("mask_diag", True))
    )


def _hk_name(base: str, index: int) -> str:
    return base if index == 0 else f"{base}_{index}"


def haiku_to_flax(hk_params: dict, config: AviciConfig) -> Params:
    """Map avici's Haiku parameter dict onto the Flax tree of `AviciNet(config)`.

    Haiku numbers modules in creation order within `BaseModel`: for block i of B = 2L
    blocks, layer_norm 4i, 4i+1, 4i+2 (q, k, v), multi_head_attention i, layer_norm
    4i+3 (FFN), linear 2i+1, 2i+2 (FFN); `linear` is the embedding; then layer_norm 4B
    (final), layer_norm 4B+1 / linear 2B+1 (u), layer_norm 4B+2 / linear 2B+2 (v).
    """

    def get(module: str) -> dict:
        key = f"BaseModel/{module}"
        if key not in hk_params:
            raise ValueError(f"AVICI checkpoint lacks Haiku module {key!r} implied by {config}")
        return hk_params[key]

    def dense(module):
        p = get(module)
        return {"kernel": np.asarray(p["w"], np.float32), "bias": np.asarray(p["b"], np.float32)}

    def ln(index):
        p = get(_hk_name("layer_norm", index))
        return {
            "scale": np.asarray(p["scale"], np.float32),
            "bias": np.asarray(p["offset"], np.float32),
        }

    blocks = 2 * config.layers
    out: dict[str, Any] = {"embed": dense("linear")}
    for i in range(blocks):
        mha = _hk_name("multi_head_attention", i)
        out[f"block_{i}"] = {
            "ln_q": ln(4 * i),
            "ln_k": ln(4 * i + 1),
            "ln_v": ln(4 * i + 2),
            "attn": {
                "query": dense(f"{mha}/query"),
                "key": dense(f"{mha}/key"),
                "value": dense(f"{mha}/value"),
                "out": dense(f"{mha}/linear"),
            },
            "ln_ffn": ln(4 * i + 3),
            "ffn_in": dense(_hk_name("linear", 2 * i + 1)),
            "ffn_out": dense(_hk_name("linear", 2 * i + 2)),
        }
    out["ln_final"] = ln(4 * blocks)
    out["ln_u"], out["u"] = ln(4 * blocks + 1), dense(_hk_name("linear", 2 * blocks + 1))
    out["ln_v"], out["v"] = ln(4 * blocks + 2), dense(_hk_name("linear", 2 * blocks + 2))
    scalars = hk_params.get("BaseModel", {})
    for src, dst in (("learned_temp", "temp"), ("final_matrix_bias", "bias")):
        if src not in scalars:
            raise ValueError(f"AVICI checkpoint lacks BaseModel/{src}")
        out[dst] = np.asarray(scalars[src], np.float32).reshape(())
    extra = _unused_modules(hk_params, blocks)
    if extra:
        raise ValueError(f"AVICI checkpoint has modules that {config} does not use: {extra[:5]}")
    check_params(out, config)
    return out


def _unused_modules(hk_params: dict, blocks: int) -> list[str]:
    def index(name):
        m = re.search(r"_(\d+)$", name)
        return int(m.group(1)) if m else 0

    extra = []
    for key in hk_params:
        leaf = key.split("/")[1] if "/" in key else ""
        if leaf.startswith("layer_norm") and index(leaf) > 4 * blocks + 2:
            extra.append(key)
        elif leaf.startswith("linear") and index(leaf) > 2 * blocks + 2:
            extra.append(key)
        elif leaf.startswith("multi_head_attention") and index(leaf) >= blocks:
            extra.append(key)
    return extra


def load_avici_checkpoint(folder: str | Path, standardization: str = "zscore") -> Pretrained:
    """Load an official AVICI checkpoint folder (kwargs.json + checkpoint_*.pkl).

    standardization: "zscore" for real-valued models (neurips-linear, -rff, scm-v0),
    "log2_cpm" for the count model (neurips-grn) — avici leaves that choice to the
    caller too. The last checkpoint_*.pkl in name order is used, with its `params`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"{folder}: an AVICI checkpoint is a folder with kwargs.json and "
            "checkpoint_*.pkl; this is not a folder"
        )
    kwargs_path = folder / "kwargs.json"
    if not kwargs_path.is_file():
        raise ValueError(f"{folder}: not an AVICI checkpoint folder (no kwargs.json)")
    try:
        kwargs = json.loads(kwargs_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{kwargs_path}: not valid JSON ({err})") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"{kwargs_path}: expected a JSON object")
    pickles = sorted(p for p in folder.iterdir() if p.suffix == ".pkl")
    if not pickles:
        raise ValueError(f"{folder}: not an AVICI checkpoint folder (no checkpoint_*.pkl)")
    config = config_from_kwargs(kwargs, standardization)
    state = read_avici_pickle(pickles[-1])
    params = haiku_to_flax(_state_params(state, pickles[-1]), config)
    step = getattr(state, "step", None)
    meta = {"source": str(pickles[-1]), "step": None if step is None else int(np.asarray(step))}
    return Pretrained(params, config, meta)
