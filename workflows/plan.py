"""From a pipeline config to its DAG of stages, every stage named by the hash of what it depends on.

Stages of a pipeline with R rounds::

    train-1 ─ couple-1 ─ train-2 ─ couple-2 ─ … ─ train-R          (reflow, stored pairs)
    train-1 ─ train-2 ─ … ─ train-R                                  (reflow, online pairs)
    couple-k ─ distill-k   (and train-k as its warm start)           (one- or k-step distillation)
    train-vp, train-subvp, train-vp_const                            (baselines: 1-RF on other paths)
    import-pi0, import-pi1 (images from a source), classifier (image features for evaluation)
    eval-<model> for every model, then report

Every stage is ``(kind, config, inputs: {role: stage})`` and its hash is
:func:`workflows.settings.stage_hash` of its kind, ``config.identity()`` and its inputs' hashes —
the same rule :func:`workflows.stage.run_stage` applies when it runs. So the plan is computed from
the config alone, before anything runs, and a changed setting changes exactly the stages
downstream of it. The run document ``pipeline-{key}.json`` at the run root records the plan for
``rectiflow status`` and the report; its key is a hash of every stage's hash, so two
configurations under one name keep separate documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workflows.settings import (
    BASELINE_LABELS,
    Choice,
    ClassifierConfig,
    CoupledPairs,
    CouplingConfig,
    DistillSettings,
    EvalConfig,
    EvalSubject,
    ImagesSpec,
    ImportConfig,
    IndependentPairs,
    OnlinePairs,
    PipelineConfig,
    ReportConfig,
    Strict,
    TrainConfig,
    content_hash,
    stage_hash,
)
from workflows.storage import Location, location

RUN_DOCUMENT = "pipeline-{key}.json"


@dataclass(frozen=True)
class StagePlan:
    """One stage: its name, kind, config, inputs (role → stage name), hash and output location."""

    name: str
    kind: str
    config: Strict = field(repr=False)
    inputs: dict[str, str]
    hash: str
    output: Location

    @property
    def needs(self) -> tuple[str, ...]:
        """The stages that must finish first (each once)."""
        return tuple(dict.fromkeys(self.inputs.values()))

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "hash": self.hash,
            "uri": self.output.uri,
            "inputs": dict(self.inputs),
        }


@dataclass
class Plan:
    """The stages of a run in dependency order."""

    config: PipelineConfig
    run: Location
    stages: dict[str, StagePlan] = field(default_factory=dict)

    def add(self, name: str, kind: str, config: Strict, inputs: dict[str, StagePlan] | None = None) -> StagePlan:
        inputs = inputs or {}
        digest = stage_hash(kind, config.identity(), {role: stage.hash for role, stage in inputs.items()})
        stage = StagePlan(
            name,
            kind,
            config,
            {role: stage.name for role, stage in inputs.items()},
            digest,
            self.run.join(f"{name}-{digest}"),
        )
        self.stages[name] = stage
        return stage

    def inputs_of(self, stage: StagePlan) -> dict[str, Location]:
        """The output locations of ``stage``'s inputs, by role."""
        return {role: self.stages[name].output for role, name in stage.inputs.items()}

    @property
    def key(self) -> str:
        """A hash of every stage's hash: the configuration's identity within the run folder."""
        return content_hash({name: stage.hash for name, stage in self.stages.items()})

    @property
    def document_location(self) -> Location:
        return self.run.join(RUN_DOCUMENT.format(key=self.key))

    def document(self) -> dict[str, Any]:
        """What the run document holds."""
        return {
            "name": self.config.name,
            "run": self.run.uri,
            "key": self.key,
            "config": self.config.model_dump(mode="json"),
            "stages": [stage.summary() for stage in self.stages.values()],
        }


def _seed(config: PipelineConfig, *parts: Any) -> int:
    """A stage seed derived from the pipeline seed and the stage's role (stable across edits of
    unrelated stages)."""
    return int(content_hash([config.seed, *parts]), 16) % 2**31


class _Builder:
    """Adds a pipeline's stages to a plan, in dependency order."""

    def __init__(self, config: PipelineConfig):
        self.plan = Plan(config, location(config.storage).join(config.name))
        pi0, imports0 = self._imported("pi0", config.pi0)
        pi1, imports1 = self._imported("pi1", config.pi1)
        self.config = config.model_copy(update={"pi0": pi0, "pi1": pi1})
        self.imports = {**imports0, **imports1}
        self.pi1_imports = imports1
        self.independent = IndependentPairs(pi0=pi0, pi1=pi1, seed0=_seed(config, "pi0"), seed1=_seed(config, "pi1"))
        self.subjects: list[tuple[StagePlan, EvalSubject]] = []

    def _imported(self, role: str, spec: Any) -> tuple[Any, dict[str, StagePlan]]:
        """``spec`` reading its data: an :class:`ImagesSpec` with a ``source`` gets an ``import-…``
        stage (π0 and π1 share one when they import the same) and reads its output."""
        if not isinstance(spec, ImagesSpec) or spec.source is None:
            return spec, {}
        config = ImportConfig(source=spec.source, shape=spec.shape, shard_size=spec.shard_size, encoding=spec.encoding)
        digest = stage_hash("import", config.identity(), {})
        same = [stage for stage in self.plan.stages.values() if stage.kind == "import" and stage.hash == digest]
        stage = same[0] if same else self.plan.add(f"import-{role}", "import", config)
        return spec.at(stage.output.uri, stage.hash), {f"{role}_images": stage}

    def train_config(self, round_number: int, data: Any, path: str | None = None) -> TrainConfig:
        settings = self.config.round_settings(round_number)
        return TrainConfig(
            model=self.config.model,
            path=path or self.config.path,
            time_sampler=self.config.time_sampler,
            seed=_seed(self.config, "train", round_number, path or self.config.path),
            data=data,
            **settings.model_dump(),
        )

    def couple(self, name: str, teacher: StagePlan, *seed_parts: Any) -> StagePlan:
        assert self.config.couple is not None
        config = CouplingConfig(
            pi0=self.config.pi0, seed=_seed(self.config, "couple", *seed_parts), **self.config.couple.model_dump()
        )
        return self.plan.add(name, "couple", config, {"teacher": teacher})

    def rounds(self) -> None:
        config, previous = self.config, None
        distilled = {d.from_round for d in config.distill if d.pairs == "coupling" and d.from_round}
        for k in range(1, config.rounds + 1):
            if previous is None:
                stage = self.plan.add("train-1", "train", self.train_config(1, self.independent), self.imports)
            elif config.reflow == "online":
                data = OnlinePairs(
                    pi0=config.pi0,
                    seed=_seed(config, "couple", k - 1),
                    solver=config.couple.solver if config.couple else "rk45@1e-5",
                )
                stage = self.plan.add(
                    f"train-{k}", "train", self.train_config(k, data), {"teacher": previous, "init": previous}
                )
            else:
                coupling = self.plan.stages[f"couple-{k - 1}"]
                stage = self.plan.add(
                    f"train-{k}",
                    "train",
                    self.train_config(k, CoupledPairs()),
                    {"coupling": coupling, "init": previous},
                )
            self.subjects.append(
                (stage, EvalSubject(name=stage.name, label=f"{k}-RF", family="rectified", round=k, path=config.path))
            )
            if (k < config.rounds and config.reflow == "stored") or k in distilled:
                self.couple(f"couple-{k}", stage, k)
            previous = stage

    def baselines(self) -> None:
        distilled = {d.from_baseline for d in self.config.distill if d.pairs == "coupling" and d.from_baseline}
        for path in self.config.baselines:
            stage = self.plan.add(f"train-{path}", "train", self.train_config(1, self.independent, path), self.imports)
            self.subjects.append(
                (
                    stage,
                    EvalSubject(name=stage.name, label=BASELINE_LABELS[path], family="baseline", round=1, path=path),
                )
            )
            if path in distilled:
                self.couple(f"couple-{path}", stage, path)

    def distillation(self, distill: DistillSettings) -> None:
        teacher = self.plan.stages[distill.teacher]
        settings = self.config.distill_settings(distill)
        seed = _seed(self.config, "distill", distill.stage_name)
        grid = Choice(name="grid", options={"k": distill.k})
        if distill.pairs == "independent":
            data, inputs = self.independent, {"init": teacher, **self.imports}
        else:
            coupling = self.plan.stages[distill.teacher.replace("train-", "couple-", 1)]
            data, inputs = CoupledPairs(), {"coupling": coupling, "init": teacher}
        config = TrainConfig(
            model=None, path="straight", time_sampler=grid, seed=seed, data=data, **settings.model_dump()
        )
        stage = self.plan.add(distill.stage_name, "train", config, inputs)
        source = "random pairs" if distill.pairs == "independent" else f"{distill.teacher_label} pairs"
        self.subjects.append(
            (
                stage,
                EvalSubject(
                    name=stage.name,
                    label=f"{distill.k}-step distilled from {source}",
                    family="distilled",
                    round=distill.from_round,
                    k=distill.k,
                    teacher=teacher.name,
                ),
            )
        )

    def evaluations(self) -> None:
        config = self.config
        classifier = None
        if config.evaluate.classifier is not None and isinstance(config.pi1, ImagesSpec):
            classifier = self.plan.add(
                "classifier",
                "classifier",
                ClassifierConfig(data=config.pi1, **config.evaluate.classifier.model_dump()),
                dict(self.pi1_imports),
            )
        settings = config.evaluate.model_dump()
        for model, subject in self.subjects:
            inputs = {"model": model}
            if subject.teacher:
                inputs["teacher"] = self.plan.stages[subject.teacher]
            if classifier is not None:
                inputs["classifier"] = classifier
            evaluation = EvalConfig(pi0=config.pi0, pi1=config.pi1, subject=subject, **settings)
            self.plan.add(f"eval-{model.name}", "eval", evaluation, inputs)
        self.plan.add("report", "report", ReportConfig(name=config.name), dict(self.plan.stages))


def build_plan(config: PipelineConfig) -> Plan:
    """The stages of ``config``'s run, under ``{storage}/{name}``."""
    builder = _Builder(config)
    builder.rounds()
    builder.baselines()
    for distill in config.distill:
        builder.distillation(distill)
    builder.evaluations()
    return builder.plan
