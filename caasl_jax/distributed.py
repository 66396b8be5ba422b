"""Multi-process (multi-host) training through JAX's multi-controller runtime.

Every process runs the same program (`caasl train ...`); `jax.distributed.initialize`
connects them, after which `jax.devices()` lists the devices of ALL processes and the
trainer's 1-D "data" mesh spans them. Each process feeds and holds only the shards on
its own devices; replicated parameters are broadcast from process 0 at start so they
are identical everywhere; only process 0 writes logs (orbax checkpoints are written
by all processes together, each its own shards).

Settings come from explicit arguments, else from environment variables:

    CAASL_COORDINATOR    host:port of process 0's coordinator service
    CAASL_NUM_PROCESSES  total number of processes
    CAASL_PROCESS_ID     this process's index, 0 .. num_processes - 1
    CAASL_LOCAL_DEVICES  CPU only: number of (fake) CPU devices of this process
    CAASL_DISTRIBUTED    "auto": let jax.distributed.initialize() detect the cluster
                         (SLURM, Open MPI, TPU pods, ...)
    CAASL_CONNECT_TIMEOUT  seconds each process waits for all of them to join (300)

With none of them set, `initialize` does nothing and training is single-process.
See docs/distributed.md for launch commands.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

import jax

ENV_COORDINATOR = "CAASL_COORDINATOR"
ENV_NUM_PROCESSES = "CAASL_NUM_PROCESSES"
ENV_PROCESS_ID = "CAASL_PROCESS_ID"
ENV_LOCAL_DEVICES = "CAASL_LOCAL_DEVICES"
ENV_AUTO = "CAASL_DISTRIBUTED"
ENV_CONNECT_TIMEOUT = "CAASL_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 300  # jax.distributed.initialize's own default


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins a multi-process run (all None: a single process).

    auto: call jax.distributed.initialize() without arguments (cluster auto-detection).
    connect_timeout: seconds each process waits for all processes to join.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_count: int | None = None
    auto: bool = False
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT

    @property
    def multi_process(self) -> bool:
        return self.auto or self.coordinator is not None


def _int_from_env(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def resolve_settings(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    auto: bool = False,
    environ: Mapping[str, str] | None = None,
    connect_timeout: int | None = None,
) -> Settings:
    """Explicit arguments, each falling back to its CAASL_* variable; validated.

    Raises ValueError for an incomplete or inconsistent combination, before any JAX
    state is touched.
    """
    environ = os.environ if environ is None else environ

    def given_or_env(value: int | None, name: str) -> int | None:
        return value if value is not None else _int_from_env(environ, name)

    auto_raw = environ.get(ENV_AUTO, "").strip().lower()
    if auto_raw not in ("", "0", "auto", "1"):
        raise ValueError(f"{ENV_AUTO} must be 'auto' (or unset), got {auto_raw!r}")
    timeout = given_or_env(connect_timeout, ENV_CONNECT_TIMEOUT)
    settings = Settings(
        coordinator=coordinator or environ.get(ENV_COORDINATOR, "").strip() or None,
        num_processes=given_or_env(num_processes, ENV_NUM_PROCESSES),
        process_id=given_or_env(process_id, ENV_PROCESS_ID),
        local_device_count=given_or_env(local_device_count, ENV_LOCAL_DEVICES),
        auto=auto or auto_raw in ("auto", "1"),
        connect_timeout=DEFAULT_CONNECT_TIMEOUT if timeout is None else timeout,
    )
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """ValueError unless the settings describe a single process, auto-detection, or a
    complete explicit (coordinator, num_processes, process_id) triple."""
    s = settings
    if s.local_device_count is not None and s.local_device_count < 1:
        raise ValueError(f"local device count must be >= 1, got {s.local_device_count}")
    if s.connect_timeout < 1:
        raise ValueError(f"connect timeout must be >= 1 s, got {s.connect_timeout}")
    explicit = (s.coordinator, s.num_processes, s.process_id)
    if s.auto:  # jax reads everything from the cluster's environment
        if any(x is not None for x in explicit):
            raise ValueError(
                "auto-detection (--distributed-auto or CAASL_DISTRIBUTED=auto) reads the "
                "cluster's environment and would ignore the coordinator, num_processes and "
                f"process_id also given (coordinator={s.coordinator!r}, num_processes="
                f"{s.num_processes}, process_id={s.process_id}); use one or the other"
            )
        return
    if all(x is None for x in explicit):
        return
    if any(x is None for x in explicit):
        raise ValueError(
            "multi-process training needs all of coordinator, num_processes and process_id "
            f"(--coordinator/--num-processes/--process-id or {ENV_COORDINATOR}/"
            f"{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); got coordinator={s.coordinator!r}, "
            f"num_processes={s.num_processes}, process_id={s.process_id}"
        )
    host, _, port = s.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator must be host:port (port 1-65535), got {s.coordinator!r}")
    if s.num_processes < 1 or not 0 <= s.process_id < s.num_processes:
        raise ValueError(
            f"need num_processes >= 1 and 0 <= process_id < num_processes, got "
            f"num_processes={s.num_processes}, process_id={s.process_id}"
        )


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    auto: bool = False,
    connect_timeout: int | None = None,
) -> bool:
    """Join the multi-process run described by the arguments / CAASL_* variables.

    Must run before anything touches a JAX device. Idempotent: a second call (e.g.
    the CLI's, then train()'s) does nothing. Returns whether this process is part of
    a multi-process run. On CPU the cross-process collectives go through gloo.
    auto: let jax.distributed.initialize() read the cluster's environment (SLURM,
    Open MPI, TPU pods, ...) instead of an explicit coordinator. connect_timeout:
    seconds to wait for every process to join (CAASL_CONNECT_TIMEOUT, default 300).
    """
    if jax.distributed.is_initialized():
        return True
    settings = resolve_settings(
        coordinator, num_processes, process_id, local_device_count, auto,
        connect_timeout=connect_timeout,
    )  # fmt: skip
    if settings.local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", settings.local_device_count)
    if not settings.multi_process:
        return False
    if settings.process_id == 0:
        check_coordinator_port_free(settings.coordinator)
    # only affects the CPU client: cross-process psum/all-gather between CPU devices
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX writes the persistent compilation cache from process 0 only, and the other
    # processes' programs miss it (their keys differ), so process 0 reached the first
    # collective minutes ahead and gloo gave up waiting (30 s). Compiling everywhere
    # keeps the processes in step.
    jax.config.update("jax_enable_compilation_cache", False)
    print(joining_message(settings), file=sys.stderr, flush=True)
    if settings.auto:
        jax.distributed.initialize(initialization_timeout=settings.connect_timeout)
    else:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            initialization_timeout=settings.connect_timeout,
        )
    return True


def joining_message(settings: Settings) -> str:
    """What a process prints before it waits for the others: JAX waits silently, and a
    process that never starts keeps the rest waiting until the timeout (as a duplicate
    process id waits for it, then aborts)."""
    if settings.auto:
        who = "this process (cluster auto-detection)"
        everyone = "all processes"
    else:
        who = f"process {settings.process_id} of {settings.num_processes}"
        everyone = f"all {settings.num_processes} processes at {settings.coordinator}"
    return (
        f"caasl: {who} waits up to {settings.connect_timeout} s for {everyone} to join "
        f"({ENV_CONNECT_TIMEOUT} or --connect-timeout changes it); if it times out, check "
        "that every process started and that their process ids are distinct"
    )


def check_coordinator_port_free(coordinator: str) -> None:
    """ValueError if the port of `coordinator` ("host:port") is already listened on here.

    Process 0 starts the coordinator service on that port. A second process 0 (a
    duplicate --process-id 0, or a run still alive from before) used to make both
    processes wait for JAX's 300 s registration timeout and then abort with a native
    stack trace; this check names the problem before anything starts.
    """
    port = int(coordinator.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port left in TIME_WAIT by a finished run is free to use;
        # only a listening socket makes the bind fail
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            raise ValueError(
                f"coordinator port {port} is already in use on this machine ({error.strerror}):"
                " another process 0 of a run (a duplicate --process-id 0 or CAASL_PROCESS_ID=0,"
                " or an earlier run still alive) or another program holds it; stop it or pick"
                " a free port for --coordinator"
            ) from None


def is_primary() -> bool:
    """True on the process that writes logs, plots and run-directory files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (no-op with a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
    """True iff `flag` is True on every process (one all-gather; local with 1 process).

    Used so that a check that fails on one process fails on all, instead of leaving
    the others waiting at the next collective.
    """
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(flag, dtype=np.int32))
    return bool(np.all(flags))


def same_everywhere(text: str) -> bool:
    """True iff every process passes the same `text` as process 0 (compared by
    SHA-256), on every process, so that all of them can refuse together."""
    import hashlib

    import numpy as np

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.int32)
    return agree(np.array_equal(broadcast_from_primary(digest), digest))


def broadcast_from_primary(tree: Any) -> Any:
    """The pytree as process 0 holds it, on every process (identity with 1 process).

    Leaves: arrays (host numpy on return when multi-process). Guarantees replicated
    values, such as freshly initialised parameters, are bit-identical everywhere.
    """
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    # an all-gather, then process 0's slice: bit-exact for every dtype (the psum in
    # multihost_utils.broadcast_one_to_all turns -0.0 into +0.0)
    gathered = multihost_utils.process_allgather(tree)  # leaves [num_processes, ...]
    return jax.tree.map(lambda x: x[0], gathered)
