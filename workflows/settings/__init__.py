"""Everything a pipeline file can say, in one schema, on one strict base with one identity rule.

- :mod:`~workflows.settings.base` — :class:`Strict`, :func:`neutral` (a field that does not
  decide the result), ``identity()``, the stage hash;
- :mod:`~workflows.settings.data` — π0 / π1 and the sources of a training stage's pairs;
- :mod:`~workflows.settings.training` — model, path, time sampler, loss, training;
- :mod:`~workflows.settings.sampling` — couplings, evaluation, the image stages, the report;
- :mod:`~workflows.settings.pipeline` — the whole file.

Nothing here imports Ray or torch: ``rectiflow validate`` checks a file in a fraction of a second,
with the torch-free option checks of :mod:`rf.options`.
"""

from workflows.settings.base import Strict, content_hash, format_errors, neutral, plain_name, stage_hash
from workflows.settings.data import (
    CoupledPairs,
    DistributionSpec,
    ImagesSpec,
    IndependentPairs,
    NoiseSpec,
    OnlinePairs,
    PairSource,
    ToySpec,
)
from workflows.settings.pipeline import BASELINE_LABELS, Baseline, DistillSettings, PipelineConfig
from workflows.settings.sampling import (
    ClassifierConfig,
    ClassifierSettings,
    CouplingConfig,
    CouplingSettings,
    EvalConfig,
    EvalSettings,
    EvalSubject,
    ImportConfig,
    ReportConfig,
    StoredDtype,
)
from workflows.settings.training import Choice, LossChoice, ModelSpec, PathName, TrainConfig, TrainSettings

__all__ = [
    "BASELINE_LABELS",
    "Baseline",
    "Choice",
    "ClassifierConfig",
    "ClassifierSettings",
    "CoupledPairs",
    "CouplingConfig",
    "CouplingSettings",
    "DistillSettings",
    "DistributionSpec",
    "EvalConfig",
    "EvalSettings",
    "EvalSubject",
    "ImagesSpec",
    "ImportConfig",
    "IndependentPairs",
    "LossChoice",
    "ModelSpec",
    "NoiseSpec",
    "OnlinePairs",
    "PairSource",
    "PathName",
    "PipelineConfig",
    "ReportConfig",
    "StoredDtype",
    "Strict",
    "ToySpec",
    "TrainConfig",
    "TrainSettings",
    "content_hash",
    "format_errors",
    "neutral",
    "plain_name",
    "stage_hash",
]
