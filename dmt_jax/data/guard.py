"""Bounds on waiting for training input: a stream that never yields ends with a one-line error, and
a stop request (SIGTERM / Ctrl-C) is honoured while the loop waits for the next batch.

tf.data drops every image that fails to decode; were none readable, `next()` would never return and
the stop flag would never be read. Two guards:
- `RunawayCheck`: the pipeline ends itself once it has read far more stream positions than it has
  delivered (see `limit`), and TrainInput turns that end into an `UnreadableInput` error.
- `BackgroundFetch`: batches are read in a daemon thread; the consumer waits on a queue in short
  slices and gives up with `StopRequested` when asked to stop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from dmt_jax.errors import UserError

DEFAULT_MAX_UNREADABLE = 1000  # data.max_unreadable_in_a_row


class StopRequested(Exception):
    """A stop was requested while the loop waited for input; no batch was handed out."""


class UnreadableInput(UserError):
    """The training stream read max_unreadable images in a row without being able to decode one."""


class RunawayCheck:
    """Shared by the pipeline (which asks `ok(position)` once per chunk of stream positions, in a
    tf.numpy_function) and TrainInput (which sets `delivered` to the position after its last batch).

    In a healthy stream the positions read run ahead of those delivered by at most the pipeline's
    buffers (one index chunk, the prefetched batches, the decodes in flight), even with half of the
    images unreadable (hence the factor 2); past that plus `max_unreadable`, images are failing in a
    row and the stream ends.
    """

    def __init__(self, start: int, max_unreadable: int, chunk: int, local_batch: int, buffered: int):
        self.delivered = start
        self.limit = max_unreadable + chunk + 2 * buffered * local_batch + 64
        self.max_unreadable = max_unreadable
        self.closed = False  # set by TrainInput.close(): ends the pipeline at its next chunk

    def ok(self, position) -> bool:
        if self.closed:
            return False
        return self.max_unreadable <= 0 or int(position) - self.delivered <= self.limit


class BackgroundFetch:
    """Reads `iterator` in a daemon thread, one item ahead; `get` waits for it in short slices."""

    def __init__(self, iterator, poll_s: float = 0.1):
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._poll_s = poll_s
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True, name="dmt-input")
        self._thread.start()

    def _run(self, iterator):
        while not self._closed.is_set():
            try:
                item = (next(iterator), None)
            except BaseException as e:  # handed to the consumer: StopIteration, decode bugs, ...
                item = (None, e)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=self._poll_s)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def get(self, stop_requested: Callable[[], bool] | None = None):
        """The next item; re-raises the iterator's exception; StopRequested if asked to stop first."""
        while True:
            try:
                item, error = self._queue.get(timeout=self._poll_s)
            except queue.Empty:
                if stop_requested is not None and stop_requested():
                    raise StopRequested() from None
                continue
            if error is not None:
                raise error
            return item

    def close(self):
        self._closed.set()
