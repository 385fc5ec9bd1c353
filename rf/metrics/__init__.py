"""Metrics of couplings (transport) and of sample quality (distribution, images)."""

from rf.metrics.distribution import (
    DISTANCE_BLOCK_BYTES,
    GaussianMoments,
    frechet_distance,
    frechet_distance_of_features,
    gaussian_statistics,
    mmd2,
    precision_recall,
)
from rf.metrics.images import extract_features, fid, inception_score, kid
from rf.metrics.inception import InceptionV3, inception_hash, load_inception
from rf.metrics.quality import (
    classifier_quality,
    coupling_metrics,
    inception_quality,
    subset_coupling_metrics,
    vector_quality,
)
from rf.metrics.transport import (
    crossing_rate,
    exact_ot_cost,
    pairing_ratio,
    straightness,
    straightness_per_sample,
    transport_cost,
    wasserstein2,
)

__all__ = [
    "DISTANCE_BLOCK_BYTES",
    "GaussianMoments",
    "InceptionV3",
    "classifier_quality",
    "coupling_metrics",
    "inception_quality",
    "subset_coupling_metrics",
    "vector_quality",
    "crossing_rate",
    "exact_ot_cost",
    "extract_features",
    "fid",
    "frechet_distance",
    "frechet_distance_of_features",
    "gaussian_statistics",
    "inception_hash",
    "inception_score",
    "kid",
    "load_inception",
    "mmd2",
    "pairing_ratio",
    "precision_recall",
    "straightness",
    "straightness_per_sample",
    "transport_cost",
    "wasserstein2",
]
