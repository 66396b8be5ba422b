"""A persistent XLA compilation cache for the command line.

Compiling the fused training step, the evaluation rollouts and the reward model takes
most of a short run (10 iterations of the small default, `caasl train --config small
--set iterations=10 --set eval_every=5`: 91 s cold, 42-50 s with a warm cache (two pairs
of runs) on the 2-core Intel VM, 2026-12-02), and a resumed run or a second evaluation
compiles the same programs again. `caasl` and the experiment scripts therefore keep
JAX's persistent cache on disk. Which folder, first match wins:

1. `JAX_COMPILATION_CACHE_DIR`: JAX's own setting, left to JAX;
2. `CAASL_COMPILE_CACHE`: a folder, or `off` for no cache;
3. `$XDG_CACHE_HOME/caasl-jax/xla/<machine>` (default `~/.cache/...`).

The `<machine>` part names the CPU's instruction-set features and the jaxlib version:
a CPU program is compiled for the host's features, so a home folder shared between
different machines must not hand one machine's code to another. Deleting the folder
is always safe; it only costs recompiles. The library itself never turns the cache
on: importing caasl_jax leaves JAX's settings alone.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

OFF = "off"


def cpu_features(cpuinfo: str) -> str:
    """The instruction-set feature list of /proc/cpuinfo's text ('flags' on x86,
    'Features' on Arm); '' when it has none."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return " ".join(sorted(value.split()))
    return ""


def machine_tag(cpuinfo: str, machine: str, jaxlib_version: str) -> str:
    """Folder name for one machine type and jaxlib: 'x86_64-<12 hex digits>'."""
    fingerprint = "\n".join((machine, cpu_features(cpuinfo), jaxlib_version))
    return f"{machine or 'unknown'}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}"


def _expand_home(path: str, environ: Mapping[str, str]) -> Path | None:
    """path with a leading ~ replaced by environ's HOME; None if it needs a HOME that
    environ lacks."""
    if path == "~" or path.startswith("~/"):
        home = environ.get("HOME")
        return Path(home + path[1:]) if home else None
    return Path(path)


def resolve_cache_dir(environ: Mapping[str, str], tag: str) -> Path | None:
    """The folder the cache should use under `environ` (read from it alone), or None
    for no cache: `off`, no HOME to put it under, or JAX_COMPILATION_CACHE_DIR already
    set (JAX then applies it itself)."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    chosen = environ.get("CAASL_COMPILE_CACHE", "").strip()
    if chosen.lower() == OFF:
        return None
    if chosen:
        return _expand_home(chosen, environ)
    base = cache_home(environ)
    return base / "xla" / tag if base else None


def cache_home(environ: Mapping[str, str]) -> Path | None:
    """caasl-jax's folder of caches, `$XDG_CACHE_HOME/caasl-jax` (default
    `~/.cache/caasl-jax`); None without a HOME to put it under."""
    base = _expand_home(environ.get("XDG_CACHE_HOME") or "~/.cache", environ)
    return base / "caasl-jax" if base else None


def this_machine_tag() -> str:
    """`machine_tag` of this machine and the installed jaxlib."""
    import jaxlib

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the processor string is the best we have
        cpuinfo = f"flags: {platform.processor()}"
    return machine_tag(cpuinfo, platform.machine(), jaxlib.__version__)


def enable() -> Path | None:
    """Point JAX's persistent compilation cache at `resolve_cache_dir`'s folder, in
    this process and (through JAX_COMPILATION_CACHE_DIR) in the processes it starts,
    such as the likelihood baselines' workers; call before anything compiles. Returns
    the folder, or None when this left JAX's settings alone. An unusable folder is
    reported on stderr and skipped: the cache only saves time, so it must never stop
    a run."""
    folder = resolve_cache_dir(os.environ, this_machine_tag())
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"caasl: compilation cache off ({folder}: {error})", file=sys.stderr)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    return folder
