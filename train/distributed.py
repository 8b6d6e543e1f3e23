"""Several processes (hosts) training one model: start-up, who does what, and agreement.

Every process runs the same program on its own devices; ``jax.distributed.initialize``
connects them so a mesh spans all processes' devices and a jitted step is one SPMD
program. On CPU, cross-process collectives go through gloo
(``jax_cpu_collectives_implementation="gloo"``).

Every process builds the whole global batch: the batchers draw the same seeded order
everywhere, and per-example randomness (masked-LM corruption) is drawn once for the global
batch, so a run gives the same batches on any number of processes.
:func:`train.sharding.shard_batch` then hands each of this process's devices the rows that
the batch sharding assigns it (``jax.make_array_from_callback``), whatever the mesh's layout
of processes; evaluation batches are replicated on every device. Decisions taken
outside the jitted step (stop now, which step to resume) must be the same everywhere:
:func:`any_process` and :func:`all_reduce_max` settle them with one tiny all-reduce.

Example (one process, so everything is trivial):
  >>> initialize()          # no coordinator configured: a no-op
  False
  >>> is_main_process(), any_process(False), all_reduce_max(3)
  (True, False, 3)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

#: Environment variables read by :func:`initialize` when the arguments are not given.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


#: Clusters whose launchers start one process per host (or per task) and describe the job in
#: environment variables, which ``jax.distributed.initialize()`` reads by itself: the
#: variable that marks each and the one that holds the number of processes.
CLUSTERS: dict[str, tuple[str, str]] = {
    "SLURM": ("SLURM_JOB_ID", "SLURM_NTASKS"),
    "Open MPI": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"),
    "Open MPI (PRRTE)": ("PRTE_LAUNCHED", "OMPI_COMM_WORLD_SIZE"),
    "a Cloud TPU pod slice": ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_HOSTNAMES"),
}


def detect_cluster(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """The cluster this process was started by, and its number of processes, when there are
    several; ``None`` otherwise (one process, or no known cluster).

    Example:
      >>> detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
      ('SLURM', 4)
      >>> detect_cluster({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"})
      ('a Cloud TPU pod slice', 2)
      >>> detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None   # one task: nothing to connect
      True
    """
    env = os.environ if env is None else env
    for name, (marker, count_variable) in CLUSTERS.items():
        if marker not in env or count_variable not in env:
            continue
        text = env[count_variable]
        count = len([h for h in text.split(",") if h.strip()]) if count_variable == "TPU_WORKER_HOSTNAMES" else int(text)
        if count > 1:
            return name, count
    return None


@dataclass(frozen=True)
class ProcessConfig:
    """Where the coordinator is, how many processes there are, and which one this is."""

    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def resolve_config(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ProcessConfig:
    """Fills unset arguments from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.

    Raises:
      ValueError: a multi-process setting with a missing or inconsistent field.

    >>> resolve_config(env={})
    ProcessConfig(coordinator_address=None, num_processes=1, process_id=0)
    >>> resolve_config("10.0.0.1:1234", 2, 1, env={}).multi_process
    True
    """
    env = os.environ if env is None else env

    def env_int(name: str) -> int | None:
        text = env.get(name)
        if text is None or text == "":
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer") from None

    address = coordinator_address or env.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else env_int(ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else env_int(ENV_PROCESS_ID)
    if count is None or count == 1:
        if index not in (None, 0):
            raise ValueError(f"process_id={index} but num_processes={count or 1}")
        return ProcessConfig(address, 1, 0)
    if count < 1:
        raise ValueError(f"num_processes must be >= 1, got {count}")
    if address is None:
        raise ValueError(
            f"num_processes={count} needs a coordinator address (host:port), as an argument or ${ENV_COORDINATOR}"
        )
    if index is None:
        raise ValueError(f"num_processes={count} needs process_id, as an argument or ${ENV_PROCESS_ID}")
    if not 0 <= index < count:
        raise ValueError(f"process_id={index} is outside [0, num_processes={count})")
    return ProcessConfig(address, count, index)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 300,
) -> bool:
    """Connects this process to the others; a no-op (returns ``False``) for a single process.

    Must run before anything touches a device. Arguments override the environment
    (:func:`resolve_config`). Without either, a process started by a cluster launcher
    (:func:`detect_cluster`: SLURM's ``srun``, Open MPI's ``mpirun``, a Cloud TPU pod slice)
    joins the others as ``jax.distributed.initialize()`` finds them from the launcher's
    environment. On CPU the gloo collectives are selected so that jitted programs over a
    cross-process mesh can all-reduce. Calling it again is harmless.

    Returns:
      ``True`` when running as one of several connected processes.
    """
    if jax.distributed.is_initialized():
        return True
    config = resolve_config(coordinator_address, num_processes, process_id)
    if not config.multi_process:
        explicit = any(v is not None for v in (coordinator_address, num_processes, process_id)) or any(
            os.environ.get(name) for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID))
        cluster = None if explicit else detect_cluster()
        if cluster is None:
            return False
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(local_device_ids=None if local_device_ids is None else list(local_device_ids),
                                   initialization_timeout=timeout_s)
        logger.info("process %d of %d, started by %s, connected", jax.process_index(), jax.process_count(), cluster[0])
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        local_device_ids=None if local_device_ids is None else list(local_device_ids),
        initialization_timeout=timeout_s,
    )
    logger.info(
        "process %d of %d connected to %s", config.process_id, config.num_processes, config.coordinator_address
    )
    return True


def is_main_process() -> bool:
    """``True`` on process 0: the one that logs, writes metrics and prints."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier called ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def all_reduce_max(value: int | float) -> int | float:
    """The largest ``value`` over all processes, the same on every process.

    E.g. the step to stop at, when each process proposes one.
    """
    if jax.process_count() == 1:
        return value
    gathered = multihost_utils.process_allgather(np.asarray(value))
    result = np.max(gathered)
    return type(value)(result.item())


def any_process(flag: bool) -> bool:
    """``True`` on every process when ``flag`` is true on at least one (a preemption notice)."""
    return any_of([flag])[0]


def any_of(flags: Sequence[bool]) -> list[bool]:
    """Each of ``flags`` true on every process when it is true on at least one, settled with
    one collective for all of them.

    >>> any_of([True, False])
    [True, False]
    """
    if jax.process_count() == 1:
        return [bool(f) for f in flags]
    gathered = multihost_utils.process_allgather(np.asarray([int(bool(f)) for f in flags], np.int32))
    return [bool(v) for v in np.max(np.asarray(gathered).reshape(-1, len(flags)), axis=0)]


def assert_same_everywhere(value: object, what: str) -> None:
    """Raises ``RuntimeError`` when processes hold different ``value`` s (a config hash, a step)."""
    if jax.process_count() == 1:
        return
    try:
        multihost_utils.assert_equal(np.asarray(value), fail_message=f"{what} differs between processes")
    except AssertionError as err:
        raise RuntimeError(str(err)) from err
