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
from rf.noise import STREAMS, uniform
from rf.paths import StraightPath
from rf.solvers import Solver
from rf.timesteps import UniformTime
from rf.toy import make_toy
from rf.training import VelocityTrainer
from workflows.couplings import CouplingFormat, encode_shard
from workflows.manifest import SUCCESS_FILE, Manifest, read_manifest, write_manifest
from workflows.settings import NoiseSpec, ToySpec
from workflows.shard_format import ShardEntry, sha256, shard_count, shard_name, shard_range
from workflows.storage import Location
from workflows.weights import model_folder, write_model

FABRICATED_CODE = {"rectiflow": "test", "git": None}


def fake_manifest(
    output: Location, kind: str, stage_hash: str, details: dict, inputs: dict | None = None, config: dict | None = None
) -> Manifest:
    """Write a finished stage's manifest of ``kind`` with ``details`` (and fixed times and code)."""
    manifest = Manifest(
        kind=kind,
        hash=stage_hash,
        stage=output.name,
        config=config or {},
        identity=config or {},
        inputs=inputs or {},
        time={"wall_seconds": 4.0, "cpu_seconds": 8.0},
        code=FABRICATED_CODE,
        details={"summary": f"a hand-made {kind} stage", **details},
    )
    write_manifest(output, manifest)
    return manifest


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
        data = encode_shard(
            fmt, index, np.arange(start, stop), x0[start:stop], x1[start:stop], torch.ones(stop - start)
        )
        if nan_at is not None and start <= nan_at < stop:
            data = _with_nan_x1(data, nan_at - start)
        output.join(shard_name(index)).write_bytes(data)
        entries.append(
            ShardEntry(index, shard_name(index), start, stop, stop - start, sha256(data), len(data)).as_dict()
        )
    fake_manifest(
        output, "couple", stage_hash, {"format": fmt.model_dump(mode="json"), "shards": entries, "pairs": pairs}
    )
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
    model_folder(stage, read_manifest(stage)).join("model.safetensors").write_bytes(b"\x80\x04 not safetensors")


def drop_hash(stage: Location) -> None:
    """Rewrite a stage's manifest without its hash."""
    value = stage.join(SUCCESS_FILE).read_json()
    del value["hash"]
    stage.join(SUCCESS_FILE).write_json(value)


def write_teacher(output: Location, model: torch.nn.Module, stage_hash: str = "testteacher") -> None:
    """A finished training stage whose final weights are ``model``'s."""
    write_model(output.join("attempt-0", "model"), model)
    fake_manifest(output, "train", stage_hash, {"model": "attempt-0/model", "steps": 1, "final_loss": 1.0})


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
        trainer.step(x0_of(ids), x1_of(ids), UniformTime().from_uniform(uniform(3, ids, stream=STREAMS.time)))
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
