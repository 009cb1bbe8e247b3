"""Batches of token windows: a shuffled, checkpointable Grain stream for training, fixed batches
for the periodic cheap eval, and a padded pass over every validation token for the exact eval.

A window is seq_len + 1 consecutive tokens: inputs are window[:-1], targets window[1:]. A split
may be one array or several shards (a prepared folder's memmaps) read as one stream
(`TokenStream`), so windows run across shard boundaries; training may mix several datasets
by weight (Grain's `MapDataset.mix`).
"""

import math
import mmap
import zlib
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from gpt_jax.data.batch import lm_batch

Batch = dict[str, np.ndarray]

# Tokens hashed from each end and the middle for WindowSource's fingerprint: enough to tell splits
# apart, cheap on a multi-GB memmap.
_FINGERPRINT_TOKENS = 4096


class TokenStream:
    """A read-only virtual concatenation of 1-D token arrays: a split's shards in stream order.

    What the window sources and eval batches read: `read(start, stop)` returns tokens
    [start, stop) of the whole stream, concatenating across shard boundaries, so windows do not
    care where a shard ends. Pickles each whole-file memmap as its file coordinates, not its data.
    """

    def __init__(self, parts: np.ndarray | Sequence[np.ndarray]):
        """Wraps `parts` (one array or a sequence of them, typically read-only memmaps)."""
        parts = [parts] if isinstance(parts, np.ndarray) else list(parts)
        if any(p.ndim != 1 for p in parts):
            raise ValueError(f"tokens must be 1-D, got shapes {[p.shape for p in parts]}.")
        if len({p.dtype for p in parts}) > 1:
            raise ValueError(f"token arrays of one stream must share a dtype, got "
                             f"{sorted({str(p.dtype) for p in parts})}.")
        self._dtype = parts[0].dtype if parts else np.dtype(np.int32)
        self._parts = [p for p in parts if len(p)]  # An empty shard holds no window.
        self._ends = np.cumsum([len(p) for p in self._parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def dtype(self) -> np.dtype:
        """The stored token dtype (reads return int32)."""
        return self._dtype

    @property
    def num_parts(self) -> int:
        """How many non-empty arrays the stream concatenates."""
        return len(self._parts)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int32, clipped to the stream's end like a slice (start ≥ 0)."""
        stop = min(stop, len(self))
        if stop <= start:
            return np.zeros(0, np.int32)
        i = int(np.searchsorted(self._ends, start, side="right"))
        begin = int(self._ends[i]) - len(self._parts[i])
        if stop <= self._ends[i]:  # The common case: inside one part, one slice.
            return np.asarray(self._parts[i][start - begin : stop - begin], dtype=np.int32)
        out = np.empty(stop - start, np.int32)
        pos = start
        while pos < stop:
            end = min(stop, int(self._ends[i]))
            out[pos - start : end - start] = self._parts[i][pos - begin : end - begin]
            begin, pos, i = end, end, i + 1
        return out

    def fingerprint(self) -> str:
        """A CRC of tokens from each end and the middle: tells splits apart cheaply."""
        n, total = _FINGERPRINT_TOKENS, len(self)
        mid = total // 2
        crc = 0
        for a, b in ((0, n), (mid, mid + n), (max(0, total - n), total)):
            # Stored dtype, as the single-array WindowSource hashed it: same fingerprints.
            crc = zlib.crc32(self.read(a, b).astype(self._dtype).tobytes(), crc)
        return f"{crc:08x}"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # Pickling a memmap copies all its data (GBs for a big corpus) into each worker process;
        # send the file's coordinates instead. Only a memmap of the file itself (base is the
        # mmap) has a trustworthy offset: slices keep their parent's.
        state["_parts"] = [
            (p.filename, p.dtype.str, p.offset, p.shape)
            if isinstance(p, np.memmap) and isinstance(p.base, mmap.mmap) else p
            for p in self._parts
        ]
        return state

    def __setstate__(self, state: dict) -> None:
        state["_parts"] = [
            np.memmap(p[0], dtype=p[1], mode="r", offset=p[2], shape=p[3])
            if isinstance(p, tuple) else p
            for p in state["_parts"]
        ]
        self.__dict__.update(state)


# One dataset's tokens: an array, its shards in stream order, or a TokenStream of them.
Tokens = np.ndarray | Sequence[np.ndarray] | TokenStream


def as_stream(tokens: Tokens) -> TokenStream:
    """`tokens` as a TokenStream (itself if it already is one)."""
    return tokens if isinstance(tokens, TokenStream) else TokenStream(tokens)


class WindowSource:
    """Grain random-access source: window i is tokens[i*seq_len : i*seq_len + seq_len + 1], int32.

    Windows overlap by one token only (the last target of one is the first input of the next),
    so one epoch predicts every token of the split once, except the first. Over several shards
    the windows tile the concatenated stream: a window may run across a shard boundary.
    """

    def __init__(self, tokens: Tokens, seq_len: int):
        """Wraps the token stream `tokens` (typically read-only memmaps)."""
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be positive, got {seq_len}.")
        self._tokens = as_stream(tokens)
        self._seq_len = seq_len
        self._len = max(0, (len(self._tokens) - 1) // seq_len)
        self._fingerprint = self._tokens.fingerprint()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range for {self!r}.")
        start = index * self._seq_len
        return self._tokens.read(start, start + self._seq_len + 1)

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

    def __init__(self, tokens: Tokens, seq_len: int, seed: int, length: int):
        """`length` elements over the token stream `tokens`; each has seq_len + 1 tokens."""
        self._tokens = as_stream(tokens)
        if len(self._tokens) < seq_len + 1:
            raise ValueError(
                f"the train split has {len(self._tokens)} tokens, fewer than one window of "
                f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or use a bigger corpus."
            )
        self._windows = WindowSource(self._tokens, seq_len)  # Validation and fingerprint.
        self._seq_len, self._len = seq_len, length
        self._num_starts = len(self._tokens) - seq_len
        self._key = _splitmix64(seed)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        start = _splitmix64(self._key ^ index) % self._num_starts
        return self._tokens.read(start, start + self._seq_len + 1)

    def __repr__(self) -> str:
        return f"RandomWindowSource({self._windows!r}, key={self._key:016x}, length={self._len})"


def shuffle_seed(seed: int | tuple[int, ...]) -> int:
    """Returns a 32-bit shuffle seed that scrambles `seed`.

    Grain's shuffle seeds epoch e with (seed + e), so raw seeds s and s + 1 would share all but one
    epoch order; hashing the seed first keeps runs with neighbouring seeds independent.
    """
    return int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])


def _dataset_seed(seed: int, index: int) -> int:
    """Dataset `index`'s seed in a mixture: the run's seed for the first (so a one-dataset run
    draws what it always drew), an independent hash of (seed, index) for the others."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence((seed, index)).generate_state(1, dtype=np.uint64)[0])


def _windows(tokens: TokenStream, seq_len: int, batch_size: int, seed: int, sampling: str,
             what: str) -> grain.MapDataset:
    """An endless MapDataset of one dataset's training windows (see train_dataset)."""
    if sampling == "random":
        return grain.MapDataset.source(RandomWindowSource(tokens, seq_len, seed, length=1 << 62))
    source = WindowSource(tokens, seq_len)
    if len(source) < batch_size:
        raise ValueError(
            f"{what} has {len(tokens)} tokens: {len(source)} windows of "
            f"data.seq_len={seq_len}, fewer than one batch of {batch_size} (train.batch_size); "
            "lower data.seq_len or train.batch_size, or use a bigger corpus."
        )
    # shuffle before repeat: Grain reseeds the shuffle per epoch from the index's epoch number.
    return grain.MapDataset.source(source).shuffle(seed=shuffle_seed(seed)).repeat(None)


def train_dataset(
    tokens: Tokens | Sequence[Tokens],
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    num_threads: int,
    prefetch: int,
    sampling: str,
    weights: Sequence[float] | None = None,
) -> grain.IterDataset:
    """Returns an endless stream of this shard's rows of each global batch: batch dicts
    (gpt_jax/data/batch.py) of [batch_size / shard_count, seq_len] arrays, rows
    [shard_index·b, (shard_index+1)·b) of the global batch of `batch_size` windows.

    Every shard walks the same global order and reads only its own rows (batching and slicing
    are lazy: a row is read only when this shard's batch asks for it), so the global batches
    are the same whatever the number of processes. `sampling="epochs"`: each epoch is a fresh
    permutation of all windows (derived from `seed` and the epoch number), and batches run on
    across epoch boundaries, so no window is ever dropped. `sampling="random"`: every window
    starts at a uniformly random token (nanoGPT's get_batch), a pure function of (seed, index).

    `tokens` is one dataset (an array, or its shards in order: windows run across shard
    boundaries). With `weights`, it is a sequence of datasets, one per weight, each windowed and
    shuffled on its own and mixed by Grain's `MapDataset.mix`: a deterministic interleave in
    the weights' proportions (rounded to integers, the smallest to 100), so any stretch of the
    stream holds each dataset's share to within a window. `iter()` of the result supports
    get_state/set_state.
    """
    check_shard(batch_size, shard_index, shard_count)
    if sampling not in SAMPLINGS:
        raise ValueError(f"data.sampling={sampling!r} is not one of {SAMPLINGS}.")
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    if weights is None:
        ds = _windows(as_stream(tokens), seq_len, batch_size, seed, sampling, "the train split")
    else:
        if len(weights) != len(tokens) or not all(w > 0 for w in weights):
            raise ValueError(f"a mixture needs one positive weight per dataset; got {len(tokens)} "
                             f"datasets and weights {list(weights)}.")
        parts = [_windows(as_stream(t), seq_len, batch_size, _dataset_seed(seed, i), sampling,
                          f"the train split of mixture dataset {i}")
                 for i, t in enumerate(tokens)]
        ds = grain.MapDataset.mix(parts, [float(w) for w in weights])
    return local_batches(ds, batch_size, shard_index, shard_count).map(lm_batch).to_iter_dataset(
        read)


def check_shard(batch_size: int, shard_index: int, shard_count: int) -> None:
    """ValueError unless process `shard_index` of `shard_count` can take an equal share of a
    global batch of `batch_size` rows."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count}).")
    if batch_size % shard_count:
        raise ValueError(f"train.batch_size={batch_size} does not split over {shard_count} "
                         "processes; make it a multiple of the process count.")


def local_batches(ds: grain.MapDataset, batch_size: int, shard_index: int, shard_count: int
                  ) -> grain.MapDataset:
    """This process's rows of each global batch of `batch_size` consecutive records of `ds`:
    every process walks the same global order, and batching and slicing are lazy (a record is
    read only when this process's batch asks for it)."""
    ds = ds.batch(batch_size // shard_count, drop_remainder=True)
    if shard_count > 1:  # Global batch b is local batches b·count … b·count + count − 1.
        ds = ds[shard_index::shard_count]
    return ds


def _check_split(tokens: TokenStream, seq_len: int, batch_size: int) -> None:
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
    tokens: Tokens, seq_len: int, batch_size: int, num_batches: int, seed: int
) -> list[Batch]:
    """Returns `num_batches` fixed batches (gpt_jax/data/batch.py) of `batch_size` windows of
    seq_len + 1 tokens at seeded offsets.

    Like nanoGPT's estimate_loss, windows start anywhere (not on a seq_len grid); unlike it, the
    same arguments always give the same batches, so successive evals are comparable.
    """
    tokens = as_stream(tokens)
    _check_split(tokens, seq_len, batch_size)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len, size=(num_batches, batch_size))
    return [lm_batch(np.stack([tokens.read(s, s + seq_len + 1) for s in row]))
            for row in starts.tolist()]


def count_full_eval_batches(num_tokens: int, seq_len: int, batch_size: int) -> int:
    """Returns how many batches `full_eval_batches` yields for a split of `num_tokens` tokens."""
    num_windows = math.ceil(max(0, num_tokens - 1) / seq_len)
    return math.ceil(num_windows / batch_size)


def full_eval_batches(tokens: Tokens, seq_len: int, batch_size: int) -> Iterator[Batch]:
    """Yields batches (gpt_jax/data/batch.py) of [B, T] arrays predicting every token once.

    Windows start every seq_len tokens; the last window and the last batch are padded with token
    0 and weight 0, so every batch has one static shape (no recompiles) and
    sum(loss * weights) / sum(weights) is the exact mean loss over all len(tokens) - 1 targets.
    """
    tokens = as_stream(tokens)
    _check_split(tokens, seq_len, batch_size)
    num_batches = count_full_eval_batches(len(tokens), seq_len, batch_size)
    return _full_eval_batches(tokens, seq_len, batch_size, num_batches)


def _full_eval_batches(
    tokens: TokenStream, seq_len: int, batch_size: int, num_batches: int
) -> Iterator[Batch]:
    # A separate generator so that full_eval_batches validates its arguments when called.
    for b in range(num_batches):
        batch = np.zeros((batch_size, seq_len + 1), dtype=np.int32)
        weights = np.zeros((batch_size, seq_len), dtype=np.float32)
        for row in range(batch_size):
            start = (b * batch_size + row) * seq_len
            window = tokens.read(start, start + seq_len + 1)
            if len(window) < 2:
                break
            batch[row, : len(window)] = window
            weights[row, : len(window) - 1] = 1.0
        yield lm_batch(batch, weights)
