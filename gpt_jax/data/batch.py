"""The batch the train and eval steps take: a dict of [B, T] arrays.

  inputs       int32    the tokens the model reads
  targets      int32    the token to predict at each position
  weights      float32  each position's weight in the loss (0: no loss, e.g. padding or a prompt)
  segment_ids  int32    optional: attention stays inside a segment (packed documents)
  positions    int32    optional: each token's position (default 0 … T-1 in every row)

The loss is Σ weights · token loss / Σ weights. A language-model window of T + 1 tokens gives
inputs = window[:-1] and targets = window[1:].
"""

from __future__ import annotations

import numpy as np

KEYS = ("inputs", "targets", "weights")  # Always present.
OPTIONAL_KEYS = ("segment_ids", "positions")


def lm_batch(windows_BT1: np.ndarray, weights_BT: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The batch of next-token prediction over windows [B, T + 1]; `weights_BT` default ones."""
    windows_BT1 = np.asarray(windows_BT1, np.int32)
    B, T1 = windows_BT1.shape
    if weights_BT is None:
        weights_BT = np.ones((B, T1 - 1), np.float32)
    return {"inputs": np.ascontiguousarray(windows_BT1[:, :-1]),
            "targets": np.ascontiguousarray(windows_BT1[:, 1:]),
            "weights": np.asarray(weights_BT, np.float32)}


def lm_batch_spec(batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, int], np.dtype]]:
    """(shape, dtype) of each array of an `lm_batch` of `batch_size` windows of `seq_len` + 1."""
    shape = (batch_size, seq_len)
    return {"inputs": (shape, np.dtype(np.int32)), "targets": (shape, np.dtype(np.int32)),
            "weights": (shape, np.dtype(np.float32))}
