"""Metrics of couplings (transport) and of sample quality (distribution)."""

from rf.metrics.distribution import (
    frechet_distance,
    frechet_distance_of_features,
    gaussian_statistics,
    mmd2,
    precision_recall,
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
    "crossing_rate",
    "exact_ot_cost",
    "frechet_distance",
    "frechet_distance_of_features",
    "gaussian_statistics",
    "mmd2",
    "pairing_ratio",
    "precision_recall",
    "straightness",
    "straightness_per_sample",
    "transport_cost",
    "wasserstein2",
]
