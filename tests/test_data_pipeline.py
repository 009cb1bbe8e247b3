"""Tests for gpt_jax.data.pipeline.

Tokens are np.arange, so a window's first token says where it starts: window i starts at i*T.
Batches are dicts (gpt_jax/data/batch.py); `_windows` turns one back into its [B, T + 1] windows.
"""

import itertools
import json
import pickle

import numpy as np
import pytest

from gpt_jax.data import pipeline

T = 8  # seq_len
B = 4  # batch_size
NUM_WINDOWS = 10


def _tokens(num_windows: int = NUM_WINDOWS) -> np.ndarray:
    return np.arange(num_windows * T + 1, dtype=np.uint16)


def _dataset(tokens=None, seed=0, shard_index=0, shard_count=1, sampling="epochs"):
    return pipeline.train_dataset(
        _tokens() if tokens is None else tokens, seq_len=T, batch_size=B, seed=seed,
        shard_index=shard_index, shard_count=shard_count, num_threads=2, prefetch=4,
        sampling=sampling,
    )


def _windows(batch: dict[str, np.ndarray], weighted: bool = True) -> np.ndarray:
    """The [B, T + 1] windows of a language-model batch dict, after checking its contract:
    int32 inputs and targets [B, T], targets the inputs shifted by one, float32 weights [B, T]
    (all ones unless `weighted` is False)."""
    assert set(batch) == {"inputs", "targets", "weights"}
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
    assert inputs.shape == targets.shape == weights.shape
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    if weighted:
        np.testing.assert_array_equal(weights, 1.0)
    return np.concatenate([inputs, targets[:, -1:]], axis=1)


def _take(iterator, n: int) -> list[np.ndarray]:
    """The windows of the next `n` batches."""
    return [_windows(b) for b in itertools.islice(iterator, n)]


def _window_ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b[:, 0] // T]


def test_window_source():
    source = pipeline.WindowSource(_tokens(), T)
    assert len(source) == NUM_WINDOWS
    np.testing.assert_array_equal(source[2], np.arange(2 * T, 3 * T + 1))
    assert source[2].dtype == np.int32
    with pytest.raises(IndexError):
        source[NUM_WINDOWS]
    # The last window needs its shifted target: one token short means one window fewer.
    assert len(pipeline.WindowSource(_tokens()[:-1], T)) == NUM_WINDOWS - 1


def test_window_source_repr_is_stable_and_distinguishes_data():
    a = repr(pipeline.WindowSource(_tokens(), T))
    assert a == repr(pipeline.WindowSource(_tokens().copy(), T))
    assert "0x" not in a and "num_windows=10" in a and "seq_len=8" in a
    assert a != repr(pipeline.WindowSource(_tokens()[::-1].copy(), T))


def test_window_source_pickles_memmap_by_path(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(100_001, dtype=np.uint16).tofile(path)
    source = pipeline.WindowSource(np.memmap(path, dtype=np.uint16, mode="r"), T)
    data = pickle.dumps(source)
    assert len(data) < 10_000  # Not the 200 KB of tokens.
    restored = pickle.loads(data)
    assert repr(restored) == repr(source)
    np.testing.assert_array_equal(restored[123], source[123])


def test_batch_shapes_and_contents():
    batch = _windows(next(iter(_dataset())))
    assert batch.shape == (B, T + 1) and batch.dtype == np.int32
    # Each row is one contiguous window on the T grid.
    np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
    assert np.all(batch[:, 0] % T == 0)


def test_deterministic_from_seed():
    a = _take(iter(_dataset(seed=3)), 6)
    b = _take(iter(_dataset(seed=3)), 6)
    c = _take(iter(_dataset(seed=4)), 6)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


def test_each_epoch_is_a_fresh_permutation():
    num_epochs = 4
    batches = _take(iter(_dataset()), num_epochs * NUM_WINDOWS // B)
    ids = _window_ids(batches)
    epochs = [ids[e * NUM_WINDOWS : (e + 1) * NUM_WINDOWS] for e in range(num_epochs)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_WINDOWS))
    assert len({tuple(e) for e in epochs}) == num_epochs


def test_shards_split_each_global_batch_into_row_blocks():
    """Whatever the process count, the global batches are the same."""
    tokens = _tokens(21)
    for sampling in ("epochs", "random"):
        whole = np.concatenate(_take(iter(_dataset(tokens, sampling=sampling)), 6))
        parts = [_take(iter(_dataset(tokens, shard_index=p, shard_count=2, sampling=sampling)), 6)
                 for p in range(2)]
        assert parts[0][0].shape == (B // 2, T + 1)
        joined = np.concatenate([np.concatenate([a, b]) for a, b in zip(*parts, strict=True)])
        np.testing.assert_array_equal(joined, whole)


def test_get_state_set_state_resumes_identically():
    it = iter(_dataset(seed=7))
    _take(it, 3)
    state = it.get_state()
    json.dumps(state)  # The checkpoint stores it.
    expected = _take(it, 5)
    resumed = iter(_dataset(seed=7))
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 5)), np.stack(expected))


def test_too_few_windows_names_config_fields():
    with pytest.raises(ValueError, match=r"data\.seq_len.*train\.batch_size"):
        _dataset(_tokens(B - 1))
    with pytest.raises(ValueError, match="shard_index"):
        _dataset(shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="multiple of the process count"):
        _dataset(shard_index=0, shard_count=3)


def test_eval_batches_fixed_and_in_range():
    tokens = _tokens()
    a = [_windows(x) for x in pipeline.eval_batches(tokens, T, B, num_batches=3, seed=0)]
    b = [_windows(x) for x in pipeline.eval_batches(tokens, T, B, num_batches=3, seed=0)]
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        assert x.shape == (B, T + 1) and x.dtype == np.int32
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(np.diff(x, axis=1), 1)  # Contiguous windows.
        assert x.max() <= len(tokens) - 1
    c = [_windows(x) for x in pipeline.eval_batches(tokens, T, B, num_batches=3, seed=1)]
    assert not np.array_equal(np.stack(a), np.stack(c))
    with pytest.raises(ValueError, match=r"data\.seq_len"):
        pipeline.eval_batches(tokens[:T], T, B, num_batches=1, seed=0)


@pytest.mark.parametrize("num_tokens", [T + 1, 5 * T + 1, 5 * T + 4, 9 * T])
def test_full_eval_covers_every_target_once(num_tokens):
    tokens = np.arange(1, num_tokens + 1, dtype=np.uint16)  # No zeros: padding stands out.
    batches = list(pipeline.full_eval_batches(tokens, T, B))
    assert len(batches) == pipeline.count_full_eval_batches(num_tokens, T, B)
    targets = []
    for batch in batches:
        _windows(batch, weighted=False)  # The contract; padding has weight 0.
        inputs, weights = batch["inputs"], batch["weights"]
        assert inputs.shape == (B, T) and set(np.unique(weights)) <= {0.0, 1.0}
        # Inputs of weighted targets are real tokens; padded targets are 0.
        assert np.all(inputs[weights > 0] > 0)
        assert np.all(batch["targets"][weights == 0] == 0)
        targets.append(batch["targets"][weights > 0])
    assert sum(b["weights"].sum() for b in batches) == num_tokens - 1
    np.testing.assert_array_equal(np.concatenate(targets), tokens[1:])


def test_random_sampling_is_uniform_deterministic_and_resumable():
    tokens = _tokens()
    batches = _take(iter(_dataset(tokens, sampling="random")), 400)
    again = _take(iter(_dataset(tokens, sampling="random")), 400)
    other = _take(iter(_dataset(tokens, seed=1, sampling="random")), 400)
    np.testing.assert_array_equal(np.stack(batches), np.stack(again))
    assert not np.array_equal(np.stack(batches), np.stack(other))
    rows = np.concatenate(batches)
    assert rows.shape[1] == T + 1 and rows.dtype == np.int32
    np.testing.assert_array_equal(rows[:, 1:] - rows[:, :-1], 1)  # Consecutive tokens.
    starts = rows[:, 0]
    num_starts = len(tokens) - T
    assert starts.min() >= 0 and starts.max() < num_starts
    # Every start is reachable, not only multiples of T; counts are roughly uniform.
    counts = np.bincount(starts, minlength=num_starts)
    assert (counts > 0).all()
    assert counts.max() < 3 * counts.mean()

    it = iter(_dataset(tokens, sampling="random"))
    _take(it, 7)
    state = it.get_state()
    want = _take(it, 5)
    resumed = iter(_dataset(tokens, sampling="random"))
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 5)), np.stack(want))


def test_unknown_sampling_is_rejected():
    with pytest.raises(ValueError, match="data.sampling"):
        _dataset(sampling="sequential")


def _shards(tokens: np.ndarray, cuts=(13, 40, 41)) -> list[np.ndarray]:
    """`tokens` cut into shards at uneven points (one shard a single token)."""
    return np.split(tokens, cuts)


def test_windows_across_shard_boundaries_equal_the_concatenated_stream():
    tokens = _tokens(21)
    parts = _shards(tokens)
    whole, sharded = pipeline.WindowSource(tokens, T), pipeline.WindowSource(parts, T)
    assert repr(sharded) == repr(whole)  # Same windows, same fingerprint.
    for i in range(len(whole)):
        np.testing.assert_array_equal(sharded[i], whole[i])
    for sampling in pipeline.SAMPLINGS:
        want = _take(iter(_dataset(tokens, sampling=sampling)), 8)
        got = _take(iter(_dataset(parts, sampling=sampling)), 8)
        np.testing.assert_array_equal(np.stack(got), np.stack(want))
    for a, b in zip(pipeline.eval_batches(parts, T, B, 3, seed=0),
                    pipeline.eval_batches(tokens, T, B, 3, seed=0), strict=True):
        np.testing.assert_array_equal(_windows(a), _windows(b))
    for a, b in zip(pipeline.full_eval_batches(parts[:-1], T, B),
                    pipeline.full_eval_batches(tokens[:41], T, B), strict=True):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_token_stream_pickles_shard_memmaps_by_path(tmp_path):
    path = tmp_path / "tokens_00000.bin"
    np.arange(100_001, dtype=np.uint16).tofile(path)
    # Shards as prepared folders open them: memmaps of one file at (unaligned) offsets.
    parts = [np.memmap(path, dtype=np.uint16, mode="r", offset=2 * start, shape=(n,))
             for start, n in ((0, 50_001), (50_001, 50_000))]
    stream = pipeline.TokenStream(parts)
    data = pickle.dumps(pipeline.WindowSource(stream, T))
    assert len(data) < 10_000  # Not the 200 KB of tokens.
    restored = pickle.loads(data)
    np.testing.assert_array_equal(restored[50_001 // T], np.arange(50_000, 50_000 + T + 1))
    np.testing.assert_array_equal(stream.read(49_990, 50_010), np.arange(49_990, 50_010))
    assert len(stream.read(99_995, 100_100)) == 6  # Clipped at the end, like a slice.


MIX_WEIGHTS = (0.6, 0.3, 0.1)


def _mixture(seed=0, shard_index=0, shard_count=1, sampling="epochs"):
    # Dataset d's tokens are d·10000 + …, so a window's first token names its dataset.
    datasets = [_shards(_tokens(300 + 70 * d) + 10_000 * d) for d in range(len(MIX_WEIGHTS))]
    return pipeline.train_dataset(datasets, T, B, seed, shard_index, shard_count, 1, 4, sampling,
                                  weights=MIX_WEIGHTS)


@pytest.mark.parametrize("sampling", pipeline.SAMPLINGS)
def test_mixture_weights_are_honoured_within_sampling_error(sampling):
    n = 3000  # Windows.
    rows = np.concatenate(_take(iter(_mixture(sampling=sampling)), n // B))
    counts = np.bincount(rows[:, 0] // 10_000, minlength=3)
    for count, p in zip(counts, MIX_WEIGHTS, strict=True):
        assert abs(count - n * p) < 4 * np.sqrt(n * p * (1 - p)), (counts, MIX_WEIGHTS)
    np.testing.assert_array_equal(np.diff(rows, axis=1), 1)  # Whole windows of one dataset.
    again = np.concatenate(_take(iter(_mixture(sampling=sampling)), 20))
    other = np.concatenate(_take(iter(_mixture(seed=1, sampling=sampling)), 20))
    np.testing.assert_array_equal(again, rows[: len(again)])
    assert not np.array_equal(other, again)


def test_mixture_splits_over_processes_and_resumes():
    whole = np.concatenate(_take(iter(_mixture()), 6))
    parts = [_take(iter(_mixture(shard_index=p, shard_count=2)), 6) for p in range(2)]
    joined = np.concatenate([np.concatenate([a, b]) for a, b in zip(*parts, strict=True)])
    np.testing.assert_array_equal(joined, whole)

    it = iter(_mixture())
    _take(it, 5)
    state = it.get_state()
    assert set(state) == {"next_index"}  # Resumable with another process count.
    want = _take(it, 4)
    resumed = iter(_mixture())
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 4)), np.stack(want))


class _RecordingStream(pipeline.TokenStream):
    """Records (tag, start) of every window read: which windows a process touched."""

    def __init__(self, tokens, tag, reads):
        super().__init__(tokens)
        self._tag, self._reads = tag, reads

    def read(self, start, stop):
        if stop - start == T + 1:  # A window (not WindowSource's fingerprint samples).
            self._reads.append((self._tag, start))
        return super().read(start, stop)


def test_each_process_reads_only_its_rows_of_a_mixture():
    datasets = [_tokens(500) + 10_000 * d for d in range(len(MIX_WEIGHTS))]  # 1 epoch ≫ 40 rows.
    whole = np.concatenate(_take(iter(pipeline.train_dataset(
        datasets, T, B, 0, 0, 1, 1, 4, "epochs", weights=MIX_WEIGHTS)), 20))
    for p in range(2):
        reads = []
        streams = [_RecordingStream(t, d, reads) for d, t in enumerate(datasets)]
        mine = np.concatenate(_take(iter(pipeline.train_dataset(
            streams, T, B, 0, p, 2, 1, 4, "epochs", weights=MIX_WEIGHTS)), 5))
        rows = whole.reshape(20, 2, B // 2, T + 1)[:, p]  # Process p's half of each batch.
        np.testing.assert_array_equal(mine, rows[:5].reshape(-1, T + 1))
        # Every window read (prefetch included) is one of this process's rows.
        ours = {(int(r[0]) // 10_000, int(r[0]) % 10_000) for r in rows.reshape(-1, T + 1)}
        assert len(reads) >= len(mine) and set(reads) <= ours


def test_mixture_needs_one_positive_weight_per_dataset():
    with pytest.raises(ValueError, match="one positive weight per dataset"):
        pipeline.train_dataset([_tokens(), _tokens()], T, B, 0, 0, 1, 1, 1, "epochs",
                               weights=[1.0])
