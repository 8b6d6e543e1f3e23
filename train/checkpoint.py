"""Checkpoints that continue training exactly, survive crashes, and restore onto any mesh.

A checkpoint of step ``s`` is the folder ``<directory>/<s>/`` written by orbax with two items:

``state``  a pytree of arrays, saved shard by shard: parameters, optimizer state, RNG keys,
           learned loss-balancing weights (``nnx.State`` trees are fine);
``meta``   one JSON document: ``step``, ``data_position`` (the data loader's resumable
           position), ``config`` (the resolved run config), ``extra`` (any other JSON-able
           state, e.g. loss-balancing statistics).

Safety:

* Writes go to ``<s>.orbax-checkpoint-tmp-*`` and are renamed when complete, with a
  ``commit_success.txt``; a step without it (a process killed mid-save) is never restored,
  and leftover temporary folders are removed when a manager opens the directory.
* A step that cannot be read (truncated or corrupted files) is skipped with a
  :class:`CheckpointSkippedWarning` naming its folder, moved aside to ``<s>.corrupt``, and
  the previous good step is restored.
* :func:`preflight` fails before training when the folder is not writable or the disk
  is too small; a save that fails (disk full, I/O error) raises :class:`CheckpointSaveError`
  and leaves earlier checkpoints intact.

Retention keeps the last ``keep_last`` steps *and* the ``keep_best`` best by a metric.
Saves are asynchronous by default: ``save`` returns once arrays are copied off the devices
and the files are written in the background.

Restoring onto another mesh: pass ``target``, the state's abstract tree with the new
shardings (:func:`train.sharding.abstract_state`).

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> manager = CheckpointManager(tempfile.mkdtemp(), save_every=10, async_save=False)
  >>> manager.save(10, {"w": jnp.ones(3)}, data_position={"epoch": 0, "index": 40})
  True
  >>> restored = manager.restore()
  >>> restored.step, restored.data_position, restored.state["w"].tolist()
  (10, {'epoch': 0, 'index': 40}, [1.0, 1.0, 1.0])
  >>> manager.close()
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

logger = logging.getLogger(__name__)

COMMIT_FILE = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"
CORRUPT_SUFFIX = ".corrupt"
STATE_ITEM = "state"
META_ITEM = "meta"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """Base class of checkpoint failures."""


class CheckpointPreflightError(CheckpointError):
    """The checkpoint folder cannot take checkpoints (not writable, not a folder, disk too small)."""


class CheckpointSaveError(CheckpointError):
    """A save failed; the checkpoints saved before it are untouched."""


class CheckpointSkippedWarning(UserWarning):
    """A checkpoint folder could not be restored and was skipped."""


# --------------------------------------------------------------------------- checks


def state_nbytes(tree: Any) -> int:
    """Bytes of all arrays in ``tree`` (global sizes, as written to disk without compression)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            continue
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
            shape, dtype = data.shape, data.dtype
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def preflight(directory: str | os.PathLike, *, required_bytes: int = 0) -> Path:
    """Checks, before training starts, that checkpoints can be written to ``directory``.

    Creates the folder, writes, syncs and deletes a probe file, and compares the free
    space with ``required_bytes`` (e.g. ``(keep_last + 1) * state_nbytes(state)``).

    Raises:
      CheckpointPreflightError: with the folder and the reason (not a folder, permission
        denied, read-only file system, ``free < required`` with both numbers).

    >>> import tempfile
    >>> preflight(tempfile.mkdtemp()).is_dir()
    True
    """
    path = Path(directory).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointPreflightError(f"checkpoint folder {path} exists but is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointPreflightError(
            f"checkpoint folder {path} cannot be created: {err.strerror or err}"
        ) from err
    probe = path / f".write-probe-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise CheckpointPreflightError(
            f"checkpoint folder {path} is not writable: {err.strerror or err}"
        ) from err
    finally:
        # on a read-only file system, removing the probe that was never written fails too:
        # that second error must not hide the first one
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    free = shutil.disk_usage(path).free
    if required_bytes and free < required_bytes:
        raise CheckpointPreflightError(
            f"checkpoint folder {path} has {_gb(free)} free but checkpoints need {_gb(required_bytes)}"
        )
    return path


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _check_json(value: Any, name: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be JSON-serializable: {err}") from err
    return value


def _to_float_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    out = {}
    for key, value in metrics.items():
        try:
            out[str(key)] = float(np.asarray(value))
        except (TypeError, ValueError) as err:
            raise TypeError(f"metric {key!r} is not a scalar number: {value!r}") from err
    return out


# --------------------------------------------------------------------------- the manager


@dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` returns: the state and everything to continue."""

    step: int
    state: Any
    data_position: dict[str, Any] | None
    config: dict[str, Any] | None
    extra: dict[str, Any] | None
    metrics: dict[str, float] | None = None
    path: Path | None = field(default=None, repr=False)


class CheckpointManager:
    """Saves every ``save_every`` steps (and when forced), keeps the last K and the best, restores safely.

    Args:
      directory: the run's checkpoint folder (created; checked by :func:`preflight`).
      save_every: :meth:`should_save` is true at multiples of it (``0``: only forced saves).
      keep_last: how many of the most recent checkpoints to keep.
      best_metric: name of a metric passed to :meth:`save`; the ``keep_best`` best
        checkpoints by it are kept as well as the last ``keep_last``.
      best_mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
      keep_best: how many best checkpoints to keep.
      async_save: write files in the background; :meth:`save` returns after the
        device-to-host copy.
      required_bytes: free space :func:`preflight` demands (0: only writability).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep_last: int = 2,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        keep_best: int = 1,
        async_save: bool = True,
        required_bytes: int = 0,
    ) -> None:
        if save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {save_every}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if best_metric is not None and keep_best < 1:
            raise ValueError(f"keep_best must be >= 1 when best_metric is set, got {keep_best}")
        self.directory = preflight(directory, required_bytes=required_bytes)
        self.save_every = save_every
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.async_save = async_save
        policies: list[Any] = [ocp_managers.LatestN(n=keep_last)]
        if best_metric is not None:
            policies.append(
                ocp_managers.BestN(
                    get_metric_fn=self._metric_of,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._remove_temporary()  # left by a process killed while saving
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _metric_of(self, metrics: Mapping[str, Any]) -> float:
        assert self.best_metric is not None
        if self.best_metric not in metrics:
            raise KeyError(f"checkpoint metrics {sorted(metrics)} lack best_metric {self.best_metric!r}")
        return float(metrics[self.best_metric])

    # ----------------------------------------------------------------- listing

    def step_path(self, step: int) -> Path:
        """The folder of ``step``."""
        return self.directory / str(step)

    def is_complete(self, step: int) -> bool:
        """A step folder is complete when it has the commit file and both items."""
        path = self.step_path(step)
        return (
            (path / COMMIT_FILE).is_file()
            and (path / STATE_ITEM).is_dir()
            and (path / META_ITEM).is_dir()
        )

    def steps(self) -> list[int]:
        """Complete steps on disk, oldest first (in-flight and half-written saves excluded)."""
        found = []
        for child in self.directory.iterdir():
            if child.is_dir() and child.name.isdigit() and self.is_complete(int(child.name)):
                found.append(int(child.name))
        return sorted(found)

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None``."""
        steps = self.steps()
        return steps[-1] if steps else None

    def best(self) -> tuple[int | None, float | None]:
        """The complete step with the best ``best_metric`` and its value (``(None, None)`` when
        no checkpoint has the metric)."""
        if self.best_metric is None:
            return None, None
        scored = []
        for step in self.steps():
            try:
                metrics = self._manager.metrics(step)
            except Exception:  # noqa: BLE001 - a step without readable metrics is not a candidate
                continue
            if metrics and self.best_metric in metrics:
                scored.append((float(metrics[self.best_metric]), step))
        if not scored:
            return None, None
        value, step = (max if self.best_mode == "max" else min)(scored, key=lambda vs: (vs[0], -vs[1]))
        return step, value

    def should_save(self, step: int) -> bool:
        """``True`` at multiples of ``save_every``."""
        return self.save_every > 0 and step % self.save_every == 0

    # ----------------------------------------------------------------- save

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_position: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` and the JSON fields as step ``step`` when :meth:`should_save` or ``force``.

        Returns ``False`` when the step is not a save step. With ``async_save`` the call
        returns once arrays are on the host; a background failure is raised by the next
        ``save``, :meth:`wait` or :meth:`close`.

        Raises:
          CheckpointSaveError: free space is below the state's size, the step exists, or
            writing failed (this or an earlier asynchronous save).
          TypeError: a JSON field or a metric is not serializable.
        """
        if not (force or self.should_save(step)):
            return False
        meta = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "data_position": _check_json(dict(data_position) if data_position is not None else None, "data_position"),
            "config": _check_json(dict(config) if config is not None else None, "config"),
            "extra": _check_json(dict(extra) if extra is not None else None, "extra"),
        }
        float_metrics = _to_float_metrics(metrics)
        if self.best_metric is not None and float_metrics is not None and self.best_metric not in float_metrics:
            raise KeyError(f"metrics {sorted(float_metrics)} lack best_metric {self.best_metric!r}")
        self._raise_pending(f"before saving step {step}")
        needed = state_nbytes(state)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointSaveError(
                f"not saving step {step}: {self.directory} has {_gb(free)} free, the state needs {_gb(needed)}; "
                f"earlier checkpoints are untouched"
            )
        if self.step_path(step).exists():
            raise CheckpointSaveError(f"step {step} already exists at {self.step_path(step)}")
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
        )
        try:
            self._manager.save(step, args=args, metrics=float_metrics, force=True)
        except Exception as err:
            self._remove_temporary(step)
            raise CheckpointSaveError(
                f"saving step {step} to {self.directory} failed: {err}; earlier checkpoints are untouched"
            ) from err
        if not self.async_save:
            self._raise_pending(f"saving step {step}")
        return True

    def _raise_pending(self, when: str) -> None:
        try:
            self._manager.check_for_errors()
        except Exception as err:
            self._remove_temporary()
            raise CheckpointSaveError(
                f"an asynchronous checkpoint save to {self.directory} failed ({when}): {err}; "
                f"earlier checkpoints are untouched"
            ) from err

    def _remove_temporary(self, step: int | None = None) -> None:
        if jax.process_index() != 0:
            return
        for child in self.directory.iterdir():
            if TMP_MARKER in child.name and (step is None or child.name.split(".", 1)[0] == str(step)):
                shutil.rmtree(child, ignore_errors=True)

    def wait(self) -> None:
        """Blocks until the background save finishes; raises :class:`CheckpointSaveError` if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            self._remove_temporary()
            raise CheckpointSaveError(
                f"an asynchronous checkpoint save to {self.directory} failed: {err}; earlier checkpoints are untouched"
            ) from err
        self._raise_pending("after waiting")

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- restore

    def restore(self, target: Any = None, *, step: int | None = None) -> Restored | None:
        """Restores ``step`` (default: the newest readable step); ``None`` when there is none.

        ``target`` is the abstract state (``jax.ShapeDtypeStruct`` leaves with the
        shardings to restore onto, :func:`train.sharding.abstract_state`); without it the
        arrays come back as saved, which needs the same devices.

        Without ``step``, a step that fails to restore is skipped with a
        :class:`CheckpointSkippedWarning` naming its folder, moved aside to
        ``<step>.corrupt``, and the next older step is tried. An explicit ``step`` that
        fails raises :class:`CheckpointError`.
        """
        self.wait()
        if step is not None:
            if not self.is_complete(step):
                raise CheckpointError(f"step {step} has no complete checkpoint at {self.step_path(step)}")
            try:
                return self._restore_step(step, target)
            except Exception as err:
                raise CheckpointError(f"checkpoint {self.step_path(step)} cannot be restored: {err}") from err
        for candidate in reversed(self.steps()):
            try:
                return self._restore_step(candidate, target)
            except Exception as err:  # noqa: BLE001 - any read failure means: use an older step
                path = self.step_path(candidate)
                warnings.warn(
                    f"checkpoint {path} cannot be restored and is skipped "
                    f"({type(err).__name__}: {str(err)[:300]}); trying an older step",
                    CheckpointSkippedWarning,
                    stacklevel=2,
                )
                self._quarantine(candidate)
        return None

    def _restore_step(self, step: int, target: Any) -> Restored:
        restore_args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
        args = ocp.args.Composite(**{STATE_ITEM: restore_args, META_ITEM: ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        meta = restored[META_ITEM]
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise CheckpointError(f"{self.step_path(step)}/{META_ITEM} does not describe step {step}: {meta!r}")
        metrics = None
        try:
            metrics = self._manager.metrics(step)
        except Exception:  # noqa: BLE001 - metrics are optional
            metrics = None
        return Restored(
            step=step,
            state=restored[STATE_ITEM],
            data_position=meta.get("data_position"),
            config=meta.get("config"),
            extra=meta.get("extra"),
            metrics=metrics,
            path=self.step_path(step),
        )

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            source = self.step_path(step)
            target = source.with_name(source.name + CORRUPT_SUFFIX)
            suffix = 1
            while target.exists():
                target = source.with_name(f"{source.name}{CORRUPT_SUFFIX}{suffix}")
                suffix += 1
            try:
                source.rename(target)
            except OSError as err:
                logger.warning("could not move unreadable checkpoint %s aside: %s", source, err)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
        self._manager.reload()


# --------------------------------------------------------------------------- preemption


class PreemptionHandler:
    """Turns SIGTERM / SIGINT into a flag the training loop checks, to save and exit cleanly.

    The first signal sets :attr:`requested`; the loop saves a checkpoint and returns. A
    second signal restores the default action and re-sends itself: the process ends at once.
    With several processes, decide together: ``distributed.any_process(handler.requested)``.

    >>> handler = PreemptionHandler().install()
    >>> handler.requested
    False
    >>> handler.uninstall()
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self._event = threading.Event()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """``True`` after the first signal."""
        return self._event.is_set()

    def install(self) -> "PreemptionHandler":
        """Installs the handlers (main thread only); returns ``self``."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Puts back the handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._event.is_set():
            logger.warning("second signal %s: exiting now", signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self._event.set()
        logger.warning("signal %s: will save a checkpoint and stop", signal.Signals(signum).name)


__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointPreflightError",
    "CheckpointSaveError",
    "CheckpointSkippedWarning",
    "PreemptionHandler",
    "Restored",
    "preflight",
    "state_nbytes",
]
