"""Test scaffolding: hand-made coupling stages and teacher stages with known contents, toy flows
trained in-process, and a fabricated run for the evaluation and report tests."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rf.coupling import Pairs, generate_pairs
from rf.models import MLPVelocity
from rf.noise import uniform
from rf.paths import StraightPath
from rf.solvers import Solver
from rf.timesteps import UniformTime
from rf.toy import make_toy
from rf.training import VelocityTrainer
from workflows.distributions import NoiseSpec, ToySpec
from workflows.shards import CouplingFormat, ShardEntry, encode_shard, sha256, shard_count, shard_name, shard_range
from workflows.stage import content_hash, write_manifest, write_progress
from workflows.stages.evaluate import EvalConfig, EvalSettings, EvalSubject, run_eval_stage
from workflows.storage import Location, location
from workflows.weights import write_model


def _with_nan_x1(data: bytes, row: int) -> bytes:
    """The shard re-written with x1 of one row set to NaN (the writer refuses NaN itself)."""
    table = pq.read_table(pa.BufferReader(data))
    x1 = np.stack(table.column("x1").to_numpy(zero_copy_only=False)).astype(np.float32)
    x1[row, 0] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(x1.reshape(-1)), x1.shape[1])
    table = table.set_column(table.column_names.index("x1"), "x1", column)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_coupling(
    output: Location,
    x0: torch.Tensor,
    x1: torch.Tensor,
    shard_size: int,
    seed: int = 0,
    stage_hash: str = "testcoupling",
    nan_at: int | None = None,
) -> CouplingFormat:
    """A finished coupling stage holding exactly the given pairs (x0 stored); ``nan_at`` puts a
    NaN into x1 of that pair, listed with a matching checksum (a corrupt producer)."""
    shape = list(x0.shape[1:])
    fmt = CouplingFormat(
        shape=shape, seed=seed, pi0=NoiseSpec(shape=shape), teacher_hash="none", solver="given", shard_size=shard_size
    )
    entries = []
    pairs = len(x0)
    for index in range(shard_count(pairs, shard_size)):
        start, stop = shard_range(index, shard_size, pairs)
        data = encode_shard(fmt, index, np.arange(start, stop), x0[start:stop], x1[start:stop], torch.ones(stop - start))
        if nan_at is not None and start <= nan_at < stop:
            data = _with_nan_x1(data, nan_at - start)
        output.join(shard_name(index)).write_bytes(data)
        entries.append(ShardEntry(index, shard_name(index), start, stop - start, sha256(data), len(data)).as_dict())
    write_manifest(output, {"hash": stage_hash, "coupling": fmt.model_dump(mode="json"), "shards": entries, "pairs": pairs})
    return fmt


def random_mlp() -> MLPVelocity:
    """A small untrained MLP on R², the same weights every call, in eval mode."""
    torch.manual_seed(0)
    return MLPVelocity(dim=2, width=32, depth=2).eval()


def constant_field(b: list[float]) -> MLPVelocity:
    """An MLP whose weights are all zero but the output bias: v(x, t) = b."""
    model = MLPVelocity(dim=len(b), width=8, depth=2)
    for parameter in model.parameters():
        torch.nn.init.zeros_(parameter)
    with torch.no_grad():
        model.net[-1].bias.copy_(torch.tensor(b))
    return model


def break_weights(stage: Location) -> None:
    """Replace a stage's weights by bytes that are not safetensors (a pickle header)."""
    stage.join("model", "model.safetensors").write_bytes(b"\x80\x04 not safetensors")


def drop_hash(stage: Location) -> None:
    """Rewrite a stage's manifest without its hash."""
    write_manifest(stage, {"model": "model"})


def write_teacher(output: Location, model: torch.nn.Module, stage_hash: str = "testteacher") -> None:
    """A finished training stage whose final weights are ``model``'s."""
    write_model(output, model)
    write_manifest(output, {"hash": stage_hash, "model": "model"})


# -- trained toy flows and a fabricated run (evaluation and report tests) -------------------------

TOY_PI0 = ToySpec(name="gaussian_mixture", options={"centers": [[-10.0, -6.0], [-10.0, 0.0], [-10.0, 6.0]]})
TOY_PI1 = ToySpec(name="gaussian_mixture", options={"centers": [[10.0, -6.0], [10.0, 0.0], [10.0, 6.0]]})
"""The seed talk's toy: three Gaussians at x = −10 → the same at x = +10 (rf.toy.three_gaussians)."""
TOY_PAIRS = 4000
TOY_PAIR_SOLVER = "rk45@1e-4"


def _train(model: torch.nn.Module, x0_of, x1_of, steps: int, batch: int = 256) -> torch.nn.Module:
    """``steps`` steps of rf's trainer on pairs addressed by example id; the EMA model, in eval mode."""
    trainer = VelocityTrainer(model, StraightPath(), lr=1e-3, warmup_steps=50, ema_decay=0.99)
    for step in range(steps):
        ids = np.arange(step * batch, (step + 1) * batch)
        trainer.step(x0_of(ids), x1_of(ids), UniformTime().from_uniform(uniform(3, ids, stream=5)))
    return trainer.ema.model.eval()


@functools.lru_cache(maxsize=1)
def toy_flows(steps: tuple[int, int] = (1000, 600)) -> tuple[MLPVelocity, MLPVelocity, Pairs]:
    """(1-RF, 2-RF, the reflow pairs between them) on the toy, trained in-process in a few seconds
    (cached for the session). Small and short: 1-RF's one-step samples are far from its flow's,
    2-RF's close (see benchmarks/toy_table.py for the full-length version)."""
    pi0 = make_toy(TOY_PI0.name, **TOY_PI0.options)
    pi1 = make_toy(TOY_PI1.name, **TOY_PI1.options)
    torch.manual_seed(0)
    first = _train(
        MLPVelocity(dim=2, width=64, depth=2), lambda ids: pi0.sample(1, ids), lambda ids: pi1.sample(2, ids), steps[0]
    )
    pairs = generate_pairs(first, Solver.parse(TOY_PAIR_SOLVER), pi0.sample(11, np.arange(TOY_PAIRS)))
    second = MLPVelocity(dim=2, width=64, depth=2)
    second.load_state_dict(first.state_dict())
    second = _train(second, lambda ids: pairs.x0[ids % TOY_PAIRS], lambda ids: pairs.x1[ids % TOY_PAIRS], steps[1])
    return first, second, pairs


def _stage(run: Location, name: str, kind: str, needs: tuple[str, ...] = ()) -> dict:
    stage_hash = content_hash([name, kind])
    return {
        "name": name,
        "kind": kind,
        "hash": stage_hash,
        "uri": run.join(f"{name}-{stage_hash}").uri,
        "needs": list(needs),
    }


FABRICATED_CODE = {"rectiflow": "test", "git": None}


def _write_training(output: Location, stage_hash: str, model: torch.nn.Module, steps: int, inputs: dict) -> None:
    """A finished training stage holding ``model``, with a manifest like the training stage's."""
    write_model(output, model)
    manifest = {
        "kind": "train", "hash": stage_hash, "model": "model", "steps": steps, "final_loss": 1.0 / steps,
        "config": {"seed": steps, "path": "straight", "steps": steps}, "inputs": inputs,
        "time": {"wall_seconds": 4.0, "cpu_seconds": 8.0}, "code": FABRICATED_CODE,
    }
    write_manifest(output, manifest)


def fabricate_toy_run(
    run: Location, name: str, evaluation: EvalSettings, labels: tuple[str, str] = ("1-RF", "2-RF")
) -> dict[str, dict]:
    """A run as the pipeline leaves it: ``pipeline.json``, finished train-1 → couple-1 → train-2
    (the :func:`toy_flows`, with manifests like the stages'), their evaluations by the real
    evaluation stage, and an unfinished distillation with its unfinished evaluation. Returns the
    plan's stage entries by name."""
    first, second, pairs = toy_flows()
    stages = {
        entry["name"]: entry
        for entry in (
            _stage(run, "train-1", "train"),
            _stage(run, "couple-1", "couple", ("train-1",)),
            _stage(run, "train-2", "train", ("train-1", "couple-1")),
            _stage(run, "distill-2", "train", ("train-2",)),
            _stage(run, "eval-train-1", "eval", ("train-1",)),
            _stage(run, "eval-train-2", "eval", ("train-2",)),
            _stage(run, "eval-distill-2", "eval", ("distill-2",)),
            _stage(run, "report", "report", ("eval-train-1", "eval-train-2", "eval-distill-2")),
        )
    }
    folder = {name: location(entry["uri"]) for name, entry in stages.items()}
    independent = {"data": {"independent": {"seed0": 1, "seed1": 2}, "hash": "independent"}, "init": None}
    _write_training(folder["train-1"], stages["train-1"]["hash"], first, 1000, independent)
    write_manifest(
        folder["couple-1"],
        {
            "kind": "couple",
            "hash": stages["couple-1"]["hash"],
            "config": {"seed": 11},
            "solver": TOY_PAIR_SOLVER,
            "pairs": TOY_PAIRS,
            "dtype": "float32",
            "nfe": {"mean": float(pairs.nfe.double().mean())},
            "inputs": {"teacher": {"uri": folder["train-1"].uri, "hash": stages["train-1"]["hash"]}},
            "code": FABRICATED_CODE,
        },
    )
    reflow = {
        "data": {"coupling": folder["couple-1"].uri, "hash": stages["couple-1"]["hash"]},
        "init": {"uri": folder["train-1"].uri, "hash": stages["train-1"]["hash"]},
    }
    _write_training(folder["train-2"], stages["train-2"]["hash"], second, 600, reflow)
    write_progress(folder["distill-2"], 40, 100, "steps", 10.0)
    config = EvalConfig(pi0=TOY_PI0, pi1=TOY_PI1, **evaluation.model_dump())
    for round_number, label in enumerate(labels, start=1):
        subject = EvalSubject(name=f"train-{round_number}", label=label, family="rectified", round=round_number)
        run_eval_stage(config, subject, folder[f"train-{round_number}"], folder[f"eval-train-{round_number}"])
    run.join("pipeline.json").write_json(
        {
            "name": name,
            "run": run.uri,
            "stages": list(stages.values()),
            "config": {
                "name": name,
                "pi0": TOY_PI0.model_dump(mode="json"),
                "pi1": TOY_PI1.model_dump(mode="json"),
                "rounds": 2,
                "evaluate": evaluation.model_dump(mode="json"),
            },
        }
    )
    return stages
