"""The scores of an evaluation row, as plain functions of arrays (the evaluation stage computes
them in workers; ``benchmarks/toy_table.py`` calls the same ones).

- the coupling (Z0, Z1): transport cost E‖Z1 − Z0‖ over all pairs; pairing ratio (that cost ÷
  the exact OT cost between the two point sets, ≥ 1) and, for 2D data, the crossing rate of the
  segments [Z0_i, Z1_i], on a subset (exact OT and crossings are quadratic or worse);
- vectors against π1: exact W2 and unbiased MMD² (Gaussian kernels at the median distance);
- images in a classifier's feature space: Fréchet distance ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b −
  2(Σ_a Σ_b)^½), k-NN precision/recall (k = 3) and the Inception Score recipe on its logits;
- images in InceptionV3's: FID (the same distance on pool3 features), Inception Score
  exp E KL(p(y|x) ‖ p(y)) and KID (unbiased MMD² with the cubic kernel (x·y/d + 1)³).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rf.metrics.distribution import frechet_distance_of_features, mmd2, precision_recall
from rf.metrics.images import fid, inception_score, kid
from rf.metrics.transport import crossing_rate, pairing_ratio, transport_cost, wasserstein2

Array = torch.Tensor | np.ndarray


def subset_coupling_metrics(x0: Array, x1: Array) -> dict[str, float]:
    """Pairing ratio and, for 2D pairs, crossing % (NaN otherwise) of the pairs (x0_i, x1_i)."""
    planar = list(x0.shape[1:]) == [2]
    return {
        "pairing_ratio": pairing_ratio(x0, x1),
        "crossing_pct": 100.0 * crossing_rate(x0, x1) if planar else math.nan,
    }


def coupling_metrics(x0: Array, x1: Array, ot_samples: int) -> dict[str, float]:
    """Transport cost over all pairs; pairing ratio and crossing % over the first ``ot_samples``."""
    return {"transport_cost": transport_cost(x0, x1), **subset_coupling_metrics(x0[:ot_samples], x1[:ot_samples])}


def vector_quality(samples: Array, reference: Array) -> dict[str, float]:
    """Exact W2 and unbiased MMD² of two point sets (images: in pixel space, flattened)."""
    a, b = samples.reshape(len(samples), -1), reference.reshape(len(reference), -1)
    return {"w2": wasserstein2(a, b), "mmd2": mmd2(a, b)}


def classifier_quality(features: Array, reference: Array, logits: Array | None = None) -> dict[str, float]:
    """Fréchet distance and k-NN precision/recall in a classifier's feature space and, from its
    ``logits``, the classifier's Inception Score exp E KL(p(y|x) ‖ p(y)) (the IS recipe with the
    run's own classifier in place of InceptionV3: 1 when every sample gets the same class
    distribution, the class count when samples are confidently and evenly spread)."""
    precision, recall = precision_recall(reference, features)
    values = {
        "fd_classifier": frechet_distance_of_features(features, reference),
        "precision": precision,
        "recall": recall,
    }
    if logits is not None:
        values["is_classifier"] = inception_score(logits)[0]
    return values


def inception_quality(
    features: Array, logits: Array, reference: Array, with_precision_recall: bool
) -> dict[str, float]:
    """FID, Inception Score and KID (and precision/recall when asked) in InceptionV3's space."""
    values = {
        "fid": fid(features, reference),
        "inception_score": inception_score(logits)[0],
        "kid": kid(features, reference, subsets=10, subset_size=min(1000, len(features)))[0],
    }
    if with_precision_recall:
        values["precision"], values["recall"] = precision_recall(reference, features)
    return values
