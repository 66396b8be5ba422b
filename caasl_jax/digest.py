"""Content digests of saved parameter trees, so that a checkpoint whose bytes were
changed in place (same size, still readable) is refused instead of restored.

Orbax and tensorstore read such files without complaint: a policy with a few flipped
bits evaluated to NaN returns, and a resumed run trained on from them. Each orbax
save records the tree's digest in `<checkpoint folder>.digests.json` beside the
folder; each restore recomputes it and compares. Checkpoints saved before digests
existed have no entry and restore unchecked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from caasl_jax.checks import CheckpointError
from caasl_jax.files import write_atomically


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of x as uint32 (4-byte dtypes bitcast, smaller ones widened)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize
    if width == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    """Per leaf: sum of bits_i * (2i + 1) mod 2^32. One flipped bit always changes it
    (an odd weight times a power of two below 2^32 is never 0 mod 2^32)."""
    sums = []
    for leaf in leaves:
        bits = _as_uint32(leaf).reshape(-1)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
        sums.append(jnp.sum(bits * weights, dtype=jnp.uint32))
    return sums


def tree_digest(tree) -> str:
    """Hex digest of a pytree's structure, shapes, dtypes and contents (arrays on any
    devices, also sharded across processes: every process must call it)."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [jnp.asarray(x) for x in leaves]
    sums = [int(s) for s in jax.device_get(_leaf_sums(arrays))] if arrays else []
    described = [str(treedef)] + [
        f"{x.shape}/{x.dtype}/{s}" for x, s in zip(arrays, sums, strict=True)
    ]
    return hashlib.sha256("\n".join(described).encode()).hexdigest()


def _digests_file(manager) -> Path:
    folder = Path(manager.directory)
    return folder.with_name(folder.name + ".digests.json")


def _read_digests(manager) -> dict:
    path = _digests_file(manager)
    if not path.exists():
        return {}
    try:
        digests = json.loads(path.read_text())
    except json.JSONDecodeError:
        digests = None
    if not isinstance(digests, dict):
        raise CheckpointError(f"{path} is damaged (not a JSON mapping of step -> digest)")
    return digests


def record_digest(manager, step: int, tree, write: bool = True) -> None:
    """Remember the digest of `tree`, saved as checkpoint `step` of `manager`. Every
    process computes it; only the one with write=True (process 0) writes the file."""
    digest = tree_digest(tree)
    if write:
        digests = {**_read_digests(manager), str(step): digest}
        write_atomically(_digests_file(manager), json.dumps(digests, indent=0).encode())


def check_digest(manager, step: int, tree) -> None:
    """CheckpointError unless `tree`, restored from checkpoint `step`, has the digest
    recorded when it was saved (no record: an older checkpoint, not checked)."""
    expected = _read_digests(manager).get(str(step))
    if expected is not None and tree_digest(tree) != expected:
        raise CheckpointError(
            f"checkpoint {step} under {manager.directory} is damaged: its contents differ "
            f"from what was saved (digest recorded in {_digests_file(manager).name})"
        )
