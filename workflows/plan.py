"""From a pipeline config to its DAG of stages, every stage named by the hash of what it depends on.

Stages of a pipeline with R rounds::

    train-1 ─ couple-1 ─ train-2 ─ couple-2 ─ … ─ train-R          (reflow, stored pairs)
    train-1 ─ train-2 ─ … ─ train-R                                  (reflow, online pairs)
    couple-k ─ distill-k   (and train-k as its warm start)           (one- or k-step distillation)
    train-vp, train-subvp                                            (baselines: 1-RF on VP / sub-VP paths)
    import-pi0, import-pi1 (images from a source), classifier (image features for evaluation)
    eval-<model> for every model, then report

A stage's hash covers its kind, its result-deciding settings and its inputs' hashes, so the plan
is computed from the config alone, before anything runs, and a changed setting changes exactly
the stages downstream of it. ``pipeline.json`` at the run root records the plan for
``rectiflow status`` and the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workflows.config import DistillSettings, PipelineConfig
from workflows.distributions import ImagesSpec
from workflows.pair_stream import IndependentSource, OnlineSource
from workflows.stage import content_hash, stage_hash
from workflows.stages.couple import CouplingConfig, coupling_hash
from workflows.stages.evaluate import EvalConfig, EvalSubject, eval_stage_hash
from workflows.stages.images import classifier_stage_hash, import_stage_hash
from workflows.stages.train import Choice, TrainConfig, independent_identity, online_identity, train_stage_hash
from workflows.storage import Location, location

BASELINE_LABELS = {"vp": "VP ODE", "subvp": "sub-VP ODE"}


@dataclass(frozen=True)
class StagePlan:
    """One stage: its name, kind, hash, output location, the stages it needs, and its arguments."""

    name: str
    kind: str
    hash: str
    output: Location
    needs: tuple[str, ...]
    arguments: dict[str, Any] = field(compare=False, repr=False)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "hash": self.hash, "uri": self.output.uri, "needs": list(self.needs)}


@dataclass
class Plan:
    """The stages of a run in dependency order."""

    config: PipelineConfig
    run: Location
    stages: dict[str, StagePlan] = field(default_factory=dict)

    def add(self, name: str, kind: str, stage_hash_: str, needs: tuple[str, ...], **arguments: Any) -> StagePlan:
        stage = StagePlan(name, kind, stage_hash_, self.run.join(f"{name}-{stage_hash_}"), needs, arguments)
        self.stages[name] = stage
        return stage

    def document(self) -> dict[str, Any]:
        """What ``pipeline.json`` holds."""
        return {
            "name": self.config.name,
            "run": self.run.uri,
            "config": self.config.model_dump(mode="json"),
            "stages": [stage.summary() for stage in self.stages.values()],
        }


def _seed(config: PipelineConfig, *parts: Any) -> int:
    """A stage seed derived from the pipeline seed and the stage's role (stable across edits of
    unrelated stages)."""
    return int(content_hash([config.seed, *parts]), 16) % 2**31


def _train_config(config: PipelineConfig, round_number: int, path: str | None = None) -> TrainConfig:
    settings = config.round_settings(round_number)
    return TrainConfig(
        model=config.model,
        path=path or config.path,
        time_sampler=config.time_sampler,
        seed=_seed(config, "train", round_number, path or config.path),
        **settings.model_dump(),
    )


def _coupling_config(config: PipelineConfig, round_number: int) -> CouplingConfig:
    assert config.couple is not None
    return CouplingConfig(pi0=config.pi0, seed=_seed(config, "couple", round_number), **config.couple.model_dump())


def _add_training(plan: Plan, name: str, train: TrainConfig, data: Any, data_hash: str,
                  init: StagePlan | None, needs: tuple[str, ...]) -> StagePlan:
    return plan.add(
        name, "train", train_stage_hash(train, data_hash, init.hash if init else None), needs,
        config=train, data=data, init=init.name if init else None,
    )


def _add_distillation(plan: Plan, config: PipelineConfig, distill: DistillSettings) -> StagePlan:
    teacher = plan.stages[f"train-{distill.from_round}"]
    settings = config.distill_settings(distill)
    train = TrainConfig(
        model=None, path="straight", time_sampler=Choice(name="grid", options={"k": distill.k}),
        seed=_seed(config, "distill", distill.stage_name), **settings.model_dump(),
    )
    if distill.pairs == "independent":
        source = IndependentSource(config.pi0, config.pi1, _seed(config, "pi0"), _seed(config, "pi1"))
        return _add_training(plan, distill.stage_name, train, source, content_hash(independent_identity(source)),
                             teacher, (teacher.name,))
    couple = plan.stages[f"couple-{distill.from_round}"]
    return _add_training(plan, distill.stage_name, train, couple.name, couple.hash, teacher, (teacher.name, couple.name))


def _imported(plan: Plan, name: str, spec: Any) -> tuple[Any, tuple[str, ...]]:
    """``spec`` reading its data: an :class:`ImagesSpec` with a ``source`` gets an ``import-…``
    stage and reads its output; the stage names the data's readers must wait for."""
    if not isinstance(spec, ImagesSpec) or spec.source is None:
        return spec, ()
    digest = import_stage_hash(spec)
    same = [stage for stage in plan.stages.values() if stage.kind == "import" and stage.hash == digest]
    stage = same[0] if same else plan.add(f"import-{name}", "import", digest, (), spec=spec)  # π0 and π1 may share one
    return spec.at(stage.output.uri, stage.hash), (stage.name,)


def build_plan(config: PipelineConfig) -> Plan:
    """The stages of ``config``'s run, under ``{storage}/{name}``."""
    plan = Plan(config, location(config.storage).join(config.name))
    pi0, imports0 = _imported(plan, "pi0", config.pi0)
    pi1, imports1 = _imported(plan, "pi1", config.pi1)
    config = config.model_copy(update={"pi0": pi0, "pi1": pi1})
    imports = tuple(dict.fromkeys(imports0 + imports1))
    independent = IndependentSource(config.pi0, config.pi1, _seed(config, "pi0"), _seed(config, "pi1"))
    independent_hash = content_hash(independent_identity(independent))
    flows: list[StagePlan] = []
    subjects: list[EvalSubject] = []
    previous: StagePlan | None = None
    coupling_rounds = {d.from_round for d in config.distill if d.pairs == "coupling"}
    for k in range(1, config.rounds + 1):
        train = _train_config(config, k)
        if previous is None:
            stage = _add_training(plan, "train-1", train, independent, independent_hash, None, imports)
        elif config.reflow == "online":
            source = OnlineSource(previous.output, config.pi0, _seed(config, "couple", k - 1),
                                  config.couple.solver if config.couple else "rk45@1e-5")
            stage = _add_training(plan, f"train-{k}", train, source, content_hash(online_identity(source, previous.hash)),
                                  previous, (previous.name,))
        else:
            couple = plan.stages[f"couple-{k - 1}"]
            stage = _add_training(plan, f"train-{k}", train, couple.name, couple.hash, previous, (previous.name, couple.name))
        flows.append(stage)
        subjects.append(EvalSubject(name=stage.name, label=f"{k}-RF", family="rectified", round=k, path=config.path))
        needs_coupling = (k < config.rounds and config.reflow == "stored") or k in coupling_rounds
        if needs_coupling:
            coupling = _coupling_config(config, k)
            plan.add(f"couple-{k}", "couple", coupling_hash(coupling, stage.hash), (stage.name,),
                     config=coupling, teacher=stage.name)
        previous = stage
    for path in config.baselines:
        flows.append(_add_training(plan, f"train-{path}", _train_config(config, 1, path), independent, independent_hash,
                                   None, imports))
        subjects.append(EvalSubject(name=f"train-{path}", label=BASELINE_LABELS[path], family="baseline", round=1, path=path))
    for distill in config.distill:
        flows.append(_add_distillation(plan, config, distill))
        source = "random pairs" if distill.pairs == "independent" else f"{distill.from_round}-RF pairs"
        subjects.append(EvalSubject(name=distill.stage_name, label=f"{distill.k}-step distilled from {source}",
                                    family="distilled", round=distill.from_round, k=distill.k,
                                    teacher=f"train-{distill.from_round}"))
    models = flows

    evaluation = EvalConfig(pi0=config.pi0, pi1=config.pi1, **config.evaluate.model_dump())
    classifier = None
    if evaluation.classifier is not None and isinstance(config.pi1, ImagesSpec):
        classifier = plan.add("classifier", "classifier", classifier_stage_hash(evaluation.classifier, config.pi1),
                              imports1, settings=evaluation.classifier, data=config.pi1)
    evals = []
    for model, subject in zip(models, subjects):
        teacher = plan.stages[subject.teacher] if subject.teacher else None
        inputs = [stage for stage in (teacher, classifier) if stage is not None]
        evals.append(plan.add(
            f"eval-{model.name}", "eval",
            eval_stage_hash(evaluation, subject, model.hash, teacher.hash if teacher else None,
                            classifier.hash if classifier else None),
            (model.name, *(stage.name for stage in inputs)), config=evaluation, subject=subject, model=model.name,
            classifier=classifier.name if classifier else None,
        ))
    plan.add("report", "report", stage_hash("report", {}, {stage.name: stage.hash for stage in evals}),
             tuple(stage.name for stage in evals))
    return plan
