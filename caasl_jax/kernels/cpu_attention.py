"""Fused softmax attention on the CPU: a C++ XLA FFI kernel, compiled on first use.

Why: on a CPU the encoders' attention is bound by memory traffic and per-product
overhead (4-wide heads, 60 x 60 and 10 x 10 weight matrices), not by arithmetic; XLA
writes every head's logits and weights to memory between kernels. `attention_cpu.cc`
keeps one head at a time in L1 cache, forward and backward, and reads q, k, v in the
[..., L, H, C] layout the Dense layers emit, so no heads-first transposes are needed.

The shared library is compiled with the system's C++ compiler (`$CXX`, else `c++`,
`g++` or `clang++`; `-O3 -march=native`, about 3 s) against jaxlib's FFI headers,
into `$CAASL_KERNEL_CACHE` or `$XDG_CACHE_HOME/caasl-jax/kernels/<machine>/` (default
`~/.cache`), keyed by the source, the compiler, its version and flags, jaxlib's
version and the CPU's features; a damaged file there is rebuilt. Built and tested with
GCC; the source also spells its one GCC-only builtin for clang, untested here (no clang
on the development VMs). The kernel takes float32 only. When that is not
possible (no compiler, a read-only home) `available()` is False with the reason in
`unavailable_reason()`, and the networks use their pure-JAX attention; so do they on
accelerators, and everywhere when the environment sets `CAASL_CPU_KERNELS=off`.
The two paths agree to float32 rounding (tests/test_cpu_attention.py), not bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("attention_cpu.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno")
SWITCH = "CAASL_CPU_KERNELS"  # "off" (or 0/false/no): always use the pure-JAX attention
KERNEL_CACHE = "CAASL_KERNEL_CACHE"  # folder for the compiled library (see kernel_folder)
_TARGETS = {
    "caasl_attention_forward": "CaaslAttentionForward",
    "caasl_attention_forward_drop": "CaaslAttentionForwardDrop",
    "caasl_attention_backward": "CaaslAttentionBackward",
    "caasl_attention_backward_drop": "CaaslAttentionBackwardDrop",
}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def kernel_folder(environ=os.environ) -> Path | None:
    """Where compiled kernels live: $CAASL_KERNEL_CACHE, else the `kernels` folder of
    `compile_cache.cache_home` (one subfolder per machine type and jaxlib)."""
    from caasl_jax.compile_cache import cache_home, this_machine_tag

    if environ.get(KERNEL_CACHE):
        return Path(environ[KERNEL_CACHE]).expanduser()
    home = cache_home(environ)
    return home / "kernels" / this_machine_tag() if home else None


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def _library_path(compiler: str) -> Path | None:
    """The library for this source, compiler (and its version), flags, jaxlib and CPU
    in `kernel_folder()`: a folder shared by several machines (CAASL_KERNEL_CACHE on a
    shared home) never hands one CPU's -march=native code to another."""
    import jaxlib

    from caasl_jax.compile_cache import this_machine_tag

    folder = kernel_folder()
    if folder is None:
        return None
    what = (
        SOURCE.read_bytes(),
        " ".join((compiler, *FLAGS)).encode(),
        _compiler_version(compiler).encode(),
        jaxlib.__version__.encode(),
        this_machine_tag().encode(),
    )
    digest = hashlib.sha256(b"\n".join(what)).hexdigest()[:16]
    return folder / f"attention-{digest}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCE into target atomically (concurrent builders each write their own
    temporary file; the last rename wins, and every candidate is complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, target)


@functools.cache
def _load() -> tuple[bool, str]:
    """(loaded and registered, why not): builds the library if needed, once a process."""
    compiler = _compiler()
    if compiler is None:
        return False, "no C++ compiler found ($CXX, c++, g++, clang++)"
    try:
        path = _library_path(compiler)
        if path is None:
            return False, f"no folder for the compiled kernel (set {KERNEL_CACHE} or HOME)"
        if not path.exists():
            _build(compiler, path)
        try:
            library = ctypes.cdll.LoadLibrary(str(path))
        except OSError:  # a damaged file in the cache: build it again, once
            _build(compiler, path)
            library = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in _TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(library, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (OSError, RuntimeError, AttributeError) as error:
        return False, f"{type(error).__name__}: {error}"
    return True, ""


def enabled_by_environment() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() not in ("off", "0", "false", "no")


def available() -> bool:
    """Whether the fused kernel can run here (builds it on the first call)."""
    return enabled_by_environment() and _load()[0]


def unavailable_reason() -> str:
    if not enabled_by_environment():
        return f"{SWITCH} is set to {os.environ[SWITCH]!r}"
    return _load()[1]


def use_for_current_backend(dtype=jnp.float32) -> bool:
    """True when attention on `dtype` operands traced now should use the kernel: CPU
    backend, float32 (the kernel's only type) and available. Warns once a process when
    the kernel is wanted on a CPU but cannot be built."""
    if jax.default_backend() != "cpu" or not enabled_by_environment():
        return False
    if jnp.dtype(dtype) != jnp.float32:
        return False
    loaded, why = _load()
    if not loaded:
        _warn_once(why)
    return loaded


@functools.cache
def _warn_once(why: str) -> None:
    warnings.warn(
        f"the fused CPU attention kernel is unavailable ({why}); the networks use the "
        f"slower pure-JAX attention (set {SWITCH}=off to silence this)",
        RuntimeWarning,
        stacklevel=3,
    )


def _varying_axes(x) -> frozenset:
    """The shard_map mesh axes x varies over (the attribute's name moved in jax 0.10)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def _call(target: str, result_shapes, *operands):
    results = jax.ffi.ffi_call(target, result_shapes, vmap_method="broadcast_all")(*operands)
    # Inside shard_map the results must vary over the mesh axes the operands vary
    # over (a custom call's results carry no such type of their own).
    axes = tuple(sorted(frozenset().union(*map(_varying_axes, operands))))
    if axes:
        results = tuple(jax.lax.pcast(r, axes, to="varying") for r in results)
    return results


def _key_mask(q, k, key_mask):
    """key_mask (bool broadcastable to [..., T], or None) as f32[..., T] of 1 / 0."""
    mask = jnp.ones((), q.dtype) if key_mask is None else key_mask.astype(q.dtype)
    return jnp.broadcast_to(mask, (*q.shape[:-3], k.shape[-3]))


def _drop_operand(q, drop):
    """(target suffix, operand f32[..., H, S, T]): the plain kernels take a 1-element
    placeholder."""
    if drop is None:
        return "", jnp.zeros((1,), q.dtype)
    *lead, s, heads, _ = q.shape
    return "_drop", jnp.broadcast_to(drop.astype(q.dtype), (*lead, heads, s, drop.shape[-1]))


def _require() -> None:
    loaded, why = _load()
    if not loaded:
        raise RuntimeError(f"caasl_jax.kernels.cpu_attention is unavailable: {why}")


def _check_operands(q, k, v) -> None:
    """TypeError / ValueError naming what the kernel cannot take (it has no broadcasting
    and float32 only), instead of a runtime error from inside XLA."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype != jnp.float32:
            raise TypeError(f"cpu_attention.attention: {name} must be float32, got {x.dtype}")
    if q.ndim < 3 or k.shape != v.shape or k.shape[:-3] != q.shape[:-3]:
        raise ValueError(
            "cpu_attention.attention: need q [..., S, H, C] and k, v [..., T, H, C] with "
            f"the same leading dims, got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if k.shape[-2:] != q.shape[-2:] or k.shape[-3] < 1:
        raise ValueError(
            f"cpu_attention.attention: heads and width of q {q.shape} and k {k.shape} "
            "must agree, with at least one key"
        )


def _forward(q, k, v, key_mask, drop_scale):
    _require()
    _check_operands(q, k, v)
    mask = _key_mask(q, k, key_mask)
    suffix, drop = _drop_operand(q, drop_scale)
    stats = jax.ShapeDtypeStruct((*q.shape[:-3], q.shape[-2], q.shape[-3]), q.dtype)
    out, row_max, row_sum = _call(
        "caasl_attention_forward" + suffix,
        (jax.ShapeDtypeStruct(q.shape, q.dtype), stats, stats),
        q, k, v, mask, drop,
    )  # fmt: skip
    return out, (q, k, v, mask, drop_scale, out, row_max, row_sum)


@jax.custom_vjp
def attention(q, k, v, key_mask=None, drop_scale=None):
    """softmax(q k / sqrt(C), keys masked) (dropped out) @ v, heads kept in place.

    q f32[..., S, H, C], k and v f32[..., T, H, C]; key_mask bool broadcastable to
    [..., T] (False: weight 0) or None; drop_scale f32[..., H, S, T] (dropout's keep
    scale on the weights, after the softmax) or None -> f32[..., S, H, C]. The same
    function as `networks.softmax_attention` in the heads-last layout. No gradient
    flows to key_mask or drop_scale. Requires `available()`.
    """
    return _forward(q, k, v, key_mask, drop_scale)[0]


def _attention_bwd(residuals, g):
    q, k, v, mask, drop_scale, out, row_max, row_sum = residuals
    suffix, drop = _drop_operand(q, drop_scale)
    dq, dk, dv = _call(
        "caasl_attention_backward" + suffix,
        tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
        q, k, v, mask, drop, out, row_max, row_sum, g,
    )  # fmt: skip
    return dq, dk, dv, None, None


attention.defvjp(_forward, _attention_bwd)
