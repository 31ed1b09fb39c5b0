"""Host-side tf.data pipelines: the training stream (exactly resumable) and the eval pass.

Training example stream, identical for every process count:
  global position g = 0, 1, 2, ...; epoch e = g // n; example = perm_e[g % n],
  perm_e = np.random.default_rng([seed, e]).permutation(n); global step s consumes g in [s*B, (s+1)*B).
Process p of P reads its contiguous slice of every global batch: its own stream position j maps to
  g = (j // B_local) * B + p * B_local + j % B_local,     B_local = B / P,
and the augmentation of the example at g is seeded by (seed, g). Images that fail to decode are
dropped and counted; each element carries j, so `state()` knows how far the stream has really gone.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from dmt_jax.data import augment, guard
from dmt_jax.data import randaugment as randaugment_lib
from dmt_jax.data.sources import Source

AUTOTUNE = tf.data.AUTOTUNE
_INDEX_CHUNK = 1024  # stream positions mapped to example indices per Python call
_FETCH_CHUNK = 64  # examples per source.tf_fetch call (for tfds: per Python call reading records)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _options(threads: int) -> tf.data.Options:
    """Bounded threads (per-core throughput is then meaningful) and an order-preserving pipeline."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = threads if threads > 0 else available_cores()
    options.threading.max_intra_op_parallelism = 1
    return options


class _StreamIndexer:
    """numpy side of the stream: process positions j -> (global positions g, example indices)."""

    def __init__(self, num_examples: int, seed: int, global_batch: int, process_index: int, local_batch: int):
        self.num_examples, self.seed = num_examples, seed
        self.global_batch, self.process_index, self.local_batch = global_batch, process_index, local_batch
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a chunk spans at most two epochs of a large dataset
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.num_examples)
        return self._permutations[epoch]

    def global_positions(self, j: np.ndarray) -> np.ndarray:
        j = np.asarray(j, np.int64)
        b = self.local_batch
        return (j // b) * self.global_batch + self.process_index * b + j % b

    def example_indices(self, g: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(g, self.num_examples)
        indices = np.empty_like(g)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            indices[here] = self.permutation(int(epoch))[offsets[here]]
        return indices

    def __call__(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = self.global_positions(j)
        return g, self.example_indices(g)


class TrainInput:
    """Infinite iterator of {'image': uint8 [B_local, H, W, 3], 'label': int32, 'id': int64} numpy batches.

    Resume: save `state()` with the checkpoint and pass it back as start / bad_so_far (see
    `resume_position`); the continued stream is then identical to an uninterrupted run.
    """

    def __init__(
        self,
        source: Source,
        *,
        global_batch: int,
        img_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        start: int = 0,
        bad_so_far: int = 0,
        num_parallel: int = AUTOTUNE,
        threads: int = 0,
        prefetch: int = 2,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
        randaugment: str = "",
        random_erasing: float = 0.0,
        max_pixels: int = augment.MAX_IMAGE_PIXELS,
        max_unreadable: int = guard.DEFAULT_MAX_UNREADABLE,
    ):
        if global_batch % process_count:
            raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
        self.source, self.img_size, self.seed = source, img_size, seed
        self.global_batch, self.process_index, self.process_count = global_batch, process_index, process_count
        self.local_batch = global_batch // process_count
        self._start, self._bad_so_far = int(start), int(bad_so_far)
        self._next_index, self._delivered = self._start, 0
        indexer = _StreamIndexer(len(source), seed, global_batch, process_index, self.local_batch)
        in_flight = num_parallel if num_parallel > 0 else 4 * available_cores()
        in_flight_examples = in_flight * (1 + _FETCH_CHUNK) + _FETCH_CHUNK  # decodes + chunk fetches
        buffered = (prefetch if prefetch > 0 else 16) + 3 + -(-in_flight_examples // self.local_batch)
        runaway = guard.RunawayCheck(self._start, max_unreadable, _INDEX_CHUNK, self.local_batch, buffered)
        self._runaway = runaway  # (the graph below must not hold `self`: __del__ stops the reader thread)
        self.stop_requested = None  # a callable: True makes a wait for input raise guard.StopRequested

        def not_runaway(chunk):  # once per chunk of positions: has the stream stopped yielding images?
            ok = tf.numpy_function(runaway.ok, [chunk["j"][0]], tf.bool, stateful=True)
            return tf.ensure_shape(ok, [])

        def locate(j):
            g, index = tf.numpy_function(indexer, [j], [tf.int64, tf.int64], stateful=False)
            return {"j": j, "g": tf.ensure_shape(g, j.shape), "id": tf.ensure_shape(index, j.shape)}

        extra_augment = randaugment_lib.make_augment(randaugment, random_erasing)  # fine-tuning only

        def fetch(chunk):
            return {**chunk, "fetched": source.tf_fetch(chunk["id"])}

        def load(element):
            encoded, label = source.tf_decode(element["fetched"])
            view_seed = tf.stack([tf.constant(seed, tf.int64), element["g"]])
            image = augment.train_transform(
                encoded,
                view_seed,
                img_size,
                max_pixels,
                scale=tuple(crop_scale),
                ratio=tuple(crop_ratio),
                interpolation=interpolation,
            )
            if extra_augment:
                image = extra_augment(image, tf.random.experimental.stateless_fold_in(view_seed, 2))
            return {"image": image, "label": label, "id": element["id"], "j": element["j"]}

        dataset = (
            tf.data.Dataset.range(self._start, 2**62)
            .batch(_INDEX_CHUNK)
            .map(locate)
            .take_while(not_runaway)
            .unbatch()
            .batch(_FETCH_CHUNK)  # raw reads a chunk at a time (one Python call for tfds), decodes per image
            .map(fetch, num_parallel_calls=num_parallel, deterministic=True)
            .unbatch()
            .map(load, num_parallel_calls=num_parallel, deterministic=True)
            .ignore_errors()  # an undecodable image is dropped here and counted by state()
            .batch(self.local_batch, drop_remainder=True)
            .prefetch(prefetch)
        )
        self.dataset = dataset.with_options(_options(threads))
        self._fetch = None

    @staticmethod
    def start_for_step(step: int, global_batch: int, process_count: int = 1) -> int:
        """Stream position of a process after `step` steps, exact while no image has been skipped."""
        return step * (global_batch // process_count)

    @staticmethod
    def resume_position(
        saved: dict | None, *, step: int, global_batch: int, process_count: int
    ) -> tuple[int, int]:
        """(start, bad_so_far) for a restart: the saved state if it was written under the same process
        count and global batch, else the position `step` steps in (exact unless images were skipped)."""
        same_layout = saved and saved.get("process_count", process_count) == process_count
        same_layout = same_layout and saved.get("global_batch", global_batch) == global_batch
        if same_layout:
            return int(saved["next_index"]), int(saved["bad_images"])
        return TrainInput.start_for_step(step, global_batch, process_count), 0

    def state(self) -> dict:
        """Position after the batches already handed out (prefetched ones are not counted)."""
        consumed = self._next_index - self._start
        return {
            "next_index": self._next_index,
            "bad_images": self._bad_so_far + consumed - self._delivered,
            "process_count": self.process_count,
            "global_batch": self.global_batch,
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._fetch is None:  # a thread reads the pipeline, so a stop request is seen while waiting
            self._fetch = guard.BackgroundFetch(self.dataset.as_numpy_iterator())
        try:
            batch = self._fetch.get(self.stop_requested)
        except StopIteration:  # the stream is endless: only the runaway check ends it
            raise guard.UnreadableInput(
                f"no image of the training data ({self.source}) could be read in more than "
                f"{self._runaway.max_unreadable} tries in a row (undecodable, or over "
                "data.max_image_pixels): check the files"
            ) from None
        positions = batch.pop("j")
        self._next_index = self._runaway.delivered = int(positions[-1]) + 1
        self._delivered += len(positions)
        return batch

    def close(self):
        """Ends the reader thread (and the pipeline, even one that finds no readable image)."""
        if hasattr(self, "_runaway"):  # (__del__ of an instance whose __init__ raised)
            self._runaway.closed = True
        if getattr(self, "_fetch", None) is not None:
            self._fetch.close()

    def __del__(self):
        self.close()


class EvalInput:
    """One pass in dataset order, per iteration: {'image': uint8, 'label': int32, 'valid': bool}.

    Process p reads the contiguous range [n*p//P, n*(p+1)//P); every process yields the same number
    of batches, the tail padded with valid=False (label -1, black image). Undecodable images are
    dropped (their slot goes to padding), so every valid row is a real, correctly labelled image.
    """

    def __init__(
        self,
        source: Source,
        *,
        global_batch: int,
        img_size: int,
        process_index: int = 0,
        process_count: int = 1,
        crop_fraction: float = 0.875,
        interpolation: str = "bilinear",
        num_parallel: int = AUTOTUNE,
        threads: int = 0,
        prefetch: int = 2,
        max_pixels: int = augment.MAX_IMAGE_PIXELS,
    ):
        if global_batch % process_count:
            raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
        n = len(source)
        self.local_batch = global_batch // process_count
        self.begin, self.end = n * process_index // process_count, n * (process_index + 1) // process_count
        largest_shard = -(-n // process_count)
        self.num_batches = -(-largest_shard // self.local_batch)

        def load(index):
            encoded, label = source.tf_lookup(index)
            image = augment.eval_transform(encoded, img_size, crop_fraction, max_pixels, interpolation)
            return {"image": image, "label": label, "valid": tf.constant(True)}

        padding = tf.data.Dataset.from_tensors(
            {
                "image": tf.zeros([img_size, img_size, 3], tf.uint8),
                "label": tf.constant(-1, tf.int32),
                "valid": tf.constant(False),
            }
        ).repeat()
        dataset = (
            tf.data.Dataset.range(self.begin, self.end)
            .map(load, num_parallel_calls=num_parallel, deterministic=True)
            .ignore_errors()
            .concatenate(padding)
            .take(self.num_batches * self.local_batch)
            .batch(self.local_batch)
            .prefetch(prefetch)
        )
        self.dataset = dataset.with_options(_options(threads))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return self.dataset.as_numpy_iterator()
