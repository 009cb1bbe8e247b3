"""Metrics of decoded sequence-pair outputs against their references (model.arch=seq2seq):

  val/token_acc    Σ over examples of target positions where the decoded token equals the
                   reference's (the EOS counted as the last position of both) / Σ reference
                   lengths (+1 for the EOS): position-wise, so a dropped token shifts the rest
  val/exact_match  the fraction of examples decoded exactly (the same ids, the same length)
  val/bleu         corpus BLEU (sacrebleu, its default 13a tokenization) over the decoded texts
  val/chrf         corpus chrF (sacrebleu)

computed on decoded outputs (the training loop decodes greedily), not teacher-forced predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def decoded_metrics(predictions: Sequence[np.ndarray], references: Sequence[np.ndarray],
                    decode: Callable[[np.ndarray], str]) -> dict[str, float]:
    """The module docstring's metrics of target ids `predictions` (without the EOS) against
    `references` (without the EOS); `decode` turns ids into text for BLEU and chrF."""
    import sacrebleu  # Here: every training process imports this module, few decode.

    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; "
                         "give one per reference, at least one.")
    matches = total = exact = 0
    for pred, ref in zip(predictions, references, strict=True):
        pred, ref = [*np.asarray(pred).tolist(), -1], [*np.asarray(ref).tolist(), -1]  # -1: EOS.
        matches += sum(p == r for p, r in zip(pred, ref, strict=False))
        total += len(ref)
        exact += pred == ref
    hypotheses = [decode(np.asarray(p)) for p in predictions]
    refs = [[decode(np.asarray(r)) for r in references]]
    return {"val/token_acc": matches / total, "val/exact_match": exact / len(references),
            "val/bleu": sacrebleu.corpus_bleu(hypotheses, refs).score,
            "val/chrf": sacrebleu.corpus_chrf(hypotheses, refs).score}
