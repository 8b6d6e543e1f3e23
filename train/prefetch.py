"""Batches built ahead: a background thread prepares the next steps' batches while the device
runs the current one.

Each item carries the data positions after its batches, so a checkpoint saved after a step
records where *that step's* data ended, however far ahead the thread has read: a resumed
run gets exactly the batches the stopped one would have.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Callable

DEPTH = 2  # items built ahead of the step that runs


@dataclasses.dataclass
class Item:
    """The batches of one step and what the loop needs to know about them."""

    step: int  # the step these batches are for (0-based: the step count before it)
    batches: dict[str, Any]  # task -> the batch placed on the devices
    positions: dict[str, dict[str, int]]  # task -> the data position after this batch
    tokens: int  # real tokens (or examples) in the batches, for tokens per second


class Prefetcher:
    """Calls ``make(step)`` for ``first_step``, ``first_step + 1``, ... in a background
    thread, at most :data:`DEPTH` items ahead of :meth:`next`. An error in ``make`` is raised
    by the :meth:`next` that would have returned its item.

    Example:
      >>> with Prefetcher(lambda s: Item(s, {}, {}, s * 10), first_step=3) as items:
      ...     [items.next().tokens for _ in range(3)]
      [30, 40, 50]
    """

    def __init__(self, make: Callable[[int], Item], first_step: int, depth: int = DEPTH):
        self._make = make
        self._queue: queue.Queue[Item | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(first_step,), name="batches", daemon=True)
        self._thread.start()

    def _run(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item: Item | BaseException = self._make(step)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            step += 1

    def next(self) -> Item:
        """The next step's item (waits while the thread builds it)."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (the items it built ahead are dropped)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
