"""Batches of token windows: a shuffled, checkpointable Grain stream for training, fixed batches
for the periodic cheap eval, and a padded pass over every validation token for the exact eval.

A window is seq_len + 1 consecutive tokens: inputs are window[:-1], targets window[1:].
"""

import math
import mmap
import zlib
from collections.abc import Iterator

import grain
import numpy as np

# Tokens hashed from each end and the middle for WindowSource's fingerprint: enough to tell splits
# apart, cheap on a multi-GB memmap.
_FINGERPRINT_TOKENS = 4096


class WindowSource:
    """Grain random-access source: window i is tokens[i*seq_len : i*seq_len + seq_len + 1], int32.

    Windows overlap by one token only (the last target of one is the first input of the next),
    so one epoch predicts every token of the split once, except the first.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        """Wraps the 1-D token array `tokens` (typically a read-only memmap)."""
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}.")
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be positive, got {seq_len}.")
        self._tokens = tokens
        self._seq_len = seq_len
        self._len = max(0, (len(tokens) - 1) // seq_len)
        n = _FINGERPRINT_TOKENS
        mid = len(tokens) // 2
        samples = (tokens[:n], tokens[mid : mid + n], tokens[-n:])
        crc = 0
        for sample in samples:
            crc = zlib.crc32(np.ascontiguousarray(sample).tobytes(), crc)
        self._fingerprint = f"{crc:08x}"

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range for {self!r}.")
        start = index * self._seq_len
        return np.asarray(self._tokens[start : start + self._seq_len + 1], dtype=np.int32)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        tokens = self._tokens
        # Pickling a memmap copies all its data (GBs for a big corpus) into each worker process;
        # send the file's coordinates instead. Only a whole-file memmap (base is the mmap) has
        # a trustworthy offset: slices keep their parent's.
        if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap):
            state["_tokens"] = (tokens.filename, tokens.dtype.str, tokens.offset, tokens.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_tokens"], tuple):
            filename, dtype, offset, shape = state["_tokens"]
            state["_tokens"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset,
                                         shape=shape)
        self.__dict__.update(state)

    def __repr__(self) -> str:
        # Grain's DataLoader checks repr(source) on restore: it must not contain an address.
        return (
            f"WindowSource(num_windows={self._len}, seq_len={self._seq_len}, "
            f"num_tokens={len(self._tokens)}, dtype={self._tokens.dtype}, "
            f"fingerprint={self._fingerprint})"
        )


_MASK64 = (1 << 64) - 1
SAMPLINGS = ("epochs", "random")


def _splitmix64(x: int) -> int:
    """A 64-bit integer hash (SplitMix64's finaliser): window i's start is a pure function of i."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class RandomWindowSource:
    """Grain source of windows at pseudo-random starts: nanoGPT's sampling (uniform over every
    start, with replacement), but indexable — element i depends only on (seed, i) — so the stream
    is deterministic, shardable and resumable from one integer."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, length: int):
        """`length` elements over the 1-D `tokens`; each has seq_len + 1 tokens."""
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the train split has {len(tokens)} tokens, fewer than one window of "
                f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or use a bigger corpus."
            )
        self._windows = WindowSource(tokens, seq_len)  # Validation, pickling, fingerprint.
        self._tokens, self._seq_len, self._len = tokens, seq_len, length
        self._num_starts = len(tokens) - seq_len
        self._key = _splitmix64(seed)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        start = _splitmix64(self._key ^ index) % self._num_starts
        return np.asarray(self._tokens[start : start + self._seq_len + 1], dtype=np.int32)

    def __repr__(self) -> str:
        return f"RandomWindowSource({self._windows!r}, key={self._key:016x}, length={self._len})"


def _shuffle_seed(seed: int) -> int:
    """Returns a 32-bit shuffle seed that scrambles `seed`.

    Grain's shuffle seeds epoch e with (seed + e), so raw seeds s and s + 1 would share all but one
    epoch order; hashing the seed first keeps runs with neighbouring seeds independent.
    """
    return int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])


def train_dataset(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    num_threads: int,
    prefetch: int,
    sampling: str,
) -> grain.IterDataset:
    """Returns an endless stream of this shard's rows of each global batch: [batch_size /
    shard_count, seq_len + 1] int32 arrays, rows [shard_index·b, (shard_index+1)·b) of the
    global batch of `batch_size` windows.

    Every shard walks the same global order and reads only its own rows, so the global batches
    are the same whatever the number of processes. `sampling="epochs"`: each epoch is a fresh
    permutation of all windows (derived from `seed` and the epoch number), and batches run on
    across epoch boundaries, so no window is ever dropped. `sampling="random"`: every window
    starts at a uniformly random token (nanoGPT's get_batch), a pure function of (seed, index).
    `iter()` of the result supports get_state/set_state.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count}).")
    if batch_size % shard_count:
        raise ValueError(f"train.batch_size={batch_size} does not split over {shard_count} "
                         "processes; make it a multiple of the process count.")
    if sampling not in SAMPLINGS:
        raise ValueError(f"data.sampling={sampling!r} is not one of {SAMPLINGS}.")
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    if sampling == "random":
        ds = grain.MapDataset.source(RandomWindowSource(tokens, seq_len, seed, length=1 << 62))
    else:
        source = WindowSource(tokens, seq_len)
        if len(source) < batch_size:
            raise ValueError(
                f"the train split has {len(tokens)} tokens: {len(source)} windows of "
                f"data.seq_len={seq_len}, fewer than one batch of {batch_size} (train.batch_size); "
                "lower data.seq_len or train.batch_size, or use a bigger corpus."
            )
        # shuffle before repeat: Grain reseeds the shuffle per epoch from the index's epoch number.
        ds = grain.MapDataset.source(source).shuffle(seed=_shuffle_seed(seed)).repeat(None)
    ds = ds.batch(batch_size // shard_count, drop_remainder=True)
    if shard_count > 1:  # Global batch b is local batches b·count … b·count + count − 1.
        ds = ds[shard_index::shard_count]
    return ds.to_iter_dataset(read)


def _check_split(tokens: np.ndarray, seq_len: int, batch_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(
            f"data.seq_len ({seq_len}) and the eval batch size ({batch_size}) must be positive."
        )
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the validation split has {len(tokens)} tokens, fewer than one window of "
            f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or use a bigger corpus."
        )


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int, seed: int
) -> list[np.ndarray]:
    """Returns `num_batches` fixed [batch_size, seq_len + 1] int32 batches at seeded offsets.

    Like nanoGPT's estimate_loss, windows start anywhere (not on a seq_len grid); unlike it, the
    same arguments always give the same batches, so successive evals are comparable.
    """
    _check_split(tokens, seq_len, batch_size)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len, size=(num_batches, batch_size))
    offsets = np.arange(seq_len + 1)
    return [np.asarray(tokens[s[:, None] + offsets], dtype=np.int32) for s in starts]


def count_full_eval_batches(num_tokens: int, seq_len: int, batch_size: int) -> int:
    """Returns how many batches `full_eval_batches` yields for a split of `num_tokens` tokens."""
    num_windows = math.ceil(max(0, num_tokens - 1) / seq_len)
    return math.ceil(num_windows / batch_size)


def full_eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (batch [B, T + 1] int32, weights [B, T] float32) predicting every token once.

    Windows start every seq_len tokens; the last window and the last batch are padded with token
    0 and weight 0, so every batch has one static shape (no recompiles) and
    sum(loss * weights) / sum(weights) is the exact mean loss over all len(tokens) - 1 targets.
    """
    _check_split(tokens, seq_len, batch_size)
    num_batches = count_full_eval_batches(len(tokens), seq_len, batch_size)
    return _full_eval_batches(tokens, seq_len, batch_size, num_batches)


def _full_eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # A separate generator so that full_eval_batches validates its arguments when called.
    for b in range(num_batches):
        batch = np.zeros((batch_size, seq_len + 1), dtype=np.int32)
        weights = np.zeros((batch_size, seq_len), dtype=np.float32)
        for row in range(batch_size):
            start = (b * batch_size + row) * seq_len
            window = tokens[start : start + seq_len + 1]
            if len(window) < 2:
                break
            batch[row, : len(window)] = window
            weights[row, : len(window) - 1] = 1.0
        yield batch, weights
