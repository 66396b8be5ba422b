"""Weights files: our msgpack format, shipped weights, and the AVICI loader's error paths."""

from __future__ import annotations

import json
import pickle

import jax
import numpy as np
import pytest

from caasl_jax.reward.checkpoint import (
    available_pretrained,
    haiku_to_flax,
    load_avici_checkpoint,
    load_pretrained,
    load_weights,
    read_avici_pickle,
    save_weights,
)
from caasl_jax.reward.model import AviciConfig, edge_probs, init_params

CFG = AviciConfig(dim=16, layers=1, heads=2, key_size=4, widening=2, out_dim=8)


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.key(0), CFG, 3)


def test_save_load_roundtrip(tmp_path, params):
    path = save_weights(tmp_path / "w.msgpack", params, CFG, {"step": 7})
    loaded, config, meta = load_weights(path)
    assert config == CFG and meta == {"step": 7}
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


def test_weights_changed_in_place_are_refused(tmp_path, params):
    """A flipped bit in a weight used to load as another number, without any error."""
    path = save_weights(tmp_path / "w.msgpack", params, CFG)
    data = bytearray(path.read_bytes())
    leaf = np.asarray(jax.tree.leaves(params)[0])
    at = bytes(data).find(leaf.tobytes())  # msgpack stores arrays as their raw bytes
    assert at > 0
    data[at] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="w.msgpack is damaged: its contents differ"):
        load_weights(path)


def test_a_folder_is_not_taken_for_a_weights_file(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a weights file"):
        load_weights(tmp_path)


def test_frozen_params_save_and_load(tmp_path, params):
    from flax.core import freeze

    path = save_weights(tmp_path / "w.msgpack", freeze(params), CFG)
    jax.tree.map(np.testing.assert_array_equal, params, load_weights(path).params)


def test_load_weights_names_the_file_when_a_tagged_file_is_damaged(tmp_path, params):
    from flax import serialization

    from caasl_jax.reward.checkpoint import FORMAT

    good = {"format": FORMAT, "config": CFG.to_json(), "meta": "{}", "params": {}}
    for label, change, message in [
        ("no-config", {"config": None}, "damaged KeyError"),
        ("bad-json", {"config": "{not json"}, "damaged JSONDecodeError"),
        ("bad-params", {}, "parameters do not match"),
    ]:
        tree = {k: v for k, v in {**good, **change}.items() if v is not None}
        path = tmp_path / f"{label}.msgpack"
        path.write_bytes(serialization.msgpack_serialize(tree))
        with pytest.raises(ValueError, match=f"{label}.msgpack: .*{message}"):
            load_weights(path)


def test_load_weights_rejects_other_files(tmp_path, params):
    with pytest.raises(ValueError, match="no such weights file"):
        load_weights(tmp_path / "missing.msgpack")
    (tmp_path / "junk.msgpack").write_bytes(b"\x00\x01not msgpack at all")
    with pytest.raises(ValueError, match="not a caasl-jax weights file"):
        load_weights(tmp_path / "junk.msgpack")
    good = save_weights(tmp_path / "good.msgpack", params, CFG).read_bytes()
    (tmp_path / "cut.msgpack").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a caasl-jax weights file"):
        load_weights(tmp_path / "cut.msgpack")
    with pytest.raises(ValueError, match="shape"):
        save_weights(tmp_path / "bad.msgpack", params, AviciConfig(dim=16, layers=1, heads=4,
                                                                   key_size=4, widening=2))


def test_shipped_weights_load_with_one_call():
    names = available_pretrained()
    if not names:
        pytest.skip("no shipped weights in caasl_jax/weights/")
    for name in names:
        params, config, meta = load_pretrained(name)
        d = int(name.rsplit("-d", 1)[1])
        data = np.random.default_rng(0).normal(size=(20, d, 2)).astype(np.float32)
        data[..., 1] = 0.0
        probs = np.asarray(edge_probs(params, data, None, config))
        assert probs.shape == (d, d) and np.all(np.isfinite(probs))
        assert "heldout" in meta and "step" in meta
    with pytest.raises(ValueError, match="no shipped reward-model weights"):
        load_pretrained("no-such-model")


def test_avici_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_avici_checkpoint(tmp_path / "nope")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with pytest.raises(ValueError, match="no kwargs.json"):
        load_avici_checkpoint(folder)
    (folder / "kwargs.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_avici_checkpoint(folder)
    (folder / "kwargs.json").write_text(json.dumps({"neural_net_kwargs": {"dim": 16}}))
    with pytest.raises(ValueError, match="no checkpoint_"):
        load_avici_checkpoint(folder)
    (folder / "checkpoint_0000001.pkl").write_bytes(b"garbage bytes")
    with pytest.raises(ValueError, match="not an AVICI checkpoint pickle"):
        load_avici_checkpoint(folder)
    (folder / "checkpoint_0000001.pkl").write_bytes(pickle.dumps({"a": np.zeros(3)}))
    with pytest.raises(ValueError, match="not an AVICI checkpoint"):
        load_avici_checkpoint(folder)


def test_unpickler_refuses_arbitrary_classes(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(ValueError("x")) .replace(b"builtins", b"subprocess"))
    with pytest.raises(ValueError, match="not an AVICI checkpoint pickle"):
        read_avici_pickle(path)


def test_unpickler_refuses_numpy_functions_that_run_code(tmp_path):
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')".encode()
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"cnumpy.testing._private.utils\nrunstring\n(V" + code + b"\n}tR.")
    with pytest.raises(ValueError, match="refusing to load numpy.testing"):
        read_avici_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_unpickler_reads_numpy_arrays_dtypes_and_scalars(tmp_path, protocol):
    state = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.zeros(3, np.int32),
        "c": np.float64(2.5),
        "t": np.dtype("float16"),
    }
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(state, protocol=protocol))
    loaded = read_avici_pickle(path)
    assert loaded.keys() == state.keys() and loaded["t"] == state["t"]
    for key in "abc":
        np.testing.assert_array_equal(loaded[key], state[key])
        assert loaded[key].dtype == state[key].dtype


def test_haiku_mapping_reports_missing_modules():
    with pytest.raises(ValueError, match="lacks Haiku module 'BaseModel/linear'"):
        haiku_to_flax({"BaseModel": {"learned_temp": np.zeros((1, 1, 1))}}, CFG)
