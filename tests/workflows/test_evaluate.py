"""The evaluation stage on a real local Ray: closed forms of a constant field, independence from
workers and blocks, the paper's ordering of 1-RF and 2-RF, finished outputs, and bad input."""

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from rf.coupling import generate_pairs
from rf.metrics import wasserstein2
from rf.solvers import Solver
from tests.workflows.helpers import (
    TOY_PI0,
    TOY_PI1,
    break_weights,
    constant_field,
    drop_hash,
    random_mlp,
    toy_flows,
    write_teacher,
)
from workflows.distributions import sample_by_id
from workflows.eval_files import INDEPENDENT, METRIC_COLUMNS, read_table
from workflows.manifest import SUCCESS_FILE
from workflows.settings import EvalConfig, EvalSettings, EvalSubject, NoiseSpec, stage_hash
from workflows.stage import PROGRESS_FILE
from workflows.stages import evaluate
from workflows.stages.eval_worker import EvalError
from workflows.storage import location

SHIFT = (20.0, 0.0)  # π1 of the toy is π0 moved by exactly this
SUBJECT = EvalSubject(name="train-1", label="1-RF", family="rectified", round=1)


def config(**overrides) -> EvalConfig:
    values = dict(
        subject=SUBJECT,
        pi0=TOY_PI0,
        pi1=TOY_PI1,
        samplers=["euler@1", "euler@4", "rk45@1e-3"],
        samples=300,
        ot_samples=150,
        reference_solver="rk45@1e-3",
        trajectories=8,
        workers=1,
    )
    return EvalConfig(**{**values, **overrides})


def run_eval_stage(settings: EvalConfig, subject: EvalSubject, model, output, teacher=None):
    """The evaluation of ``model`` by ``settings`` for ``subject`` (its teacher when distilled)."""
    inputs = {"model": model, **({"teacher": teacher} if teacher else {})}
    return evaluate.run(settings.model_copy(update={"subject": subject}), inputs, output)


def stage_file(output, name: str):
    """A file of a finished evaluation, where its manifest says it is."""
    from workflows.manifest import read_manifest

    return output.join(read_manifest(output).details["files"][name]["path"])


def rows_by_sampler(output) -> dict[str, dict]:
    return {row["sampler"]: row for row in read_table(stage_file(output, "metrics.parquet")).to_pylist()}


def eval_stage_hash(settings: EvalConfig, subject: EvalSubject, model_hash: str) -> str:
    return stage_hash("eval", settings.model_copy(update={"subject": subject}).identity(), {"model": model_hash})


def _blocks_of(samples: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, samples)) for start in range(0, samples, size)]


def test_a_constant_field_gives_the_closed_forms(storage_root, ray_session):
    """v = b moves every Z0 to Z0 + b along a straight line: cost ‖b‖, straightness 0, an optimal
    pairing (ratio 1) without crossings, and every sampler lands where the fine solve does."""
    root = location(storage_root)
    model, output = root.join("train-1"), root.join("eval-train-1")
    write_teacher(model, constant_field(SHIFT), stage_hash="constantfield")
    settings = config(workers=2 if not root.is_local else 1)
    manifest = run_eval_stage(settings, SUBJECT, model, output)

    rows = rows_by_sampler(output)
    assert list(rows) == ["euler@1", "euler@4", "rk45@0.001"]
    x0 = sample_by_id(TOY_PI0, settings.seed, np.arange(300))
    reference = sample_by_id(TOY_PI1, settings.seed + 1, np.arange(300))
    for row in rows.values():
        assert row["transport_cost"] == pytest.approx(20.0, rel=1e-5)
        assert row["straightness"] == pytest.approx(0.0, abs=1e-4)
        assert row["pairing_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert row["crossing_pct"] == 0.0
        assert row["one_step_distance"] == pytest.approx(0.0, abs=1e-4)
        assert row["w2"] == pytest.approx(wasserstein2(x0[:150] + torch.tensor(SHIFT), reference[:150]), rel=1e-4)
        assert (row["samples"], row["ot_samples"], row["seed"], row["model_hash"]) == (300, 150, 1234, "constantfield")
    assert (rows["euler@1"]["nfe_mean"], rows["euler@4"]["nfe_max"]) == (1.0, 4)
    assert 2 < rows["rk45@0.001"]["nfe_mean"] <= rows["rk45@0.001"]["nfe_max"]
    # the independent pairs (Z0, X1 ~ π1): the seed talk's random pairing, about 1.06 and 46 %
    details = manifest.details
    assert 1.03 < details["independent"]["pairing_ratio"] < 1.09
    assert 40 < details["independent"]["crossing_pct"] < 52

    assert manifest.hash == eval_stage_hash(settings, SUBJECT, "constantfield")
    assert manifest.inputs["model"] == {"uri": model.uri, "hash": "constantfield"}
    assert [row["sampler"] for row in details["rows"]] == list(rows)
    assert details["solvers"] == ["euler@1", "euler@4", "rk45@0.001"]
    assert set(output.list_names()) == {"attempt-0", PROGRESS_FILE, SUCCESS_FILE}
    assert {"metrics.parquet", "samples.parquet", "trajectories.parquet"} <= set(output.join("attempt-0").list_names())
    assert output.join(PROGRESS_FILE).read_json()["done"] == 2  # blocks of 256 ids: [0, 256), [256, 300)
    assert list(read_table(stage_file(output, "metrics.parquet")).column_names) == list(METRIC_COLUMNS)
    paths = read_table(stage_file(output, "trajectories.parquet")).to_pandas()
    assert paths.groupby("sampler").size()["euler@4"] == 8 * 5  # 8 paths of 5 states
    assert sorted(paths.loc[paths["sampler"] == "euler@4", "t"].unique().tolist()) == [0.0, 0.25, 0.5, 0.75, 1.0]

    model.delete()  # a finished evaluation is returned without touching its model
    assert run_eval_stage(settings, SUBJECT, model, output) == manifest
    with pytest.raises(EvalError, match=r"finished eval stage of another configuration \(seed: 1234 there vs 7 here\)"):
        run_eval_stage(config(seed=7), SUBJECT, model, output)


def test_numbers_do_not_depend_on_workers_or_blocks(tmp_path, ray_session, monkeypatch):
    root = location(str(tmp_path))
    model = root.join("train-1")
    write_teacher(model, random_mlp())
    run_eval_stage(config(workers=1, trajectories=100), SUBJECT, model, root.join("one"))
    monkeypatch.setattr(
        evaluate, "_blocks", lambda samples, size: _blocks_of(samples, 64)
    )  # a block may hold only paths
    run_eval_stage(config(workers=2, trajectories=100), SUBJECT, model, root.join("two"))

    timing = ["wall_seconds", "cpu_seconds", "gpu_seconds"]
    one = read_table(stage_file(root.join("one"), "metrics.parquet")).to_pandas().drop(columns=timing)
    two = read_table(stage_file(root.join("two"), "metrics.parquet")).to_pandas().drop(columns=timing)
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    for name in ("samples.parquet", "trajectories.parquet"):
        assert read_table(stage_file(root.join("one"), name)).equals(read_table(stage_file(root.join("two"), name)))
    paths = read_table(stage_file(root.join("two"), "trajectories.parquet")).to_pandas()
    assert paths.groupby("sampler")["id"].nunique().to_dict() == {"euler@1": 100, "euler@4": 100, "rk45@0.001": 100}
    # Z1 is what generate_pairs gives for the whole batch at once
    samples = pd.read_parquet(stage_file(root.join("two"), "samples.parquet").path)
    x0 = sample_by_id(TOY_PI0, 1234, np.arange(300))
    for name in ("euler@4", "rk45@0.001"):
        stored = np.stack(samples.loc[samples["sampler"] == name, "x1"].to_list())
        expected = generate_pairs(random_mlp(), Solver.parse(name), x0).x1.numpy()
        np.testing.assert_array_equal(stored, expected)
    count, ids = duckdb.sql(
        f"SELECT count(*), count(DISTINCT id) FROM '{stage_file(root.join('two'), 'samples.parquet').path}' "
        f"WHERE sampler = '{INDEPENDENT}'"
    ).fetchall()[0]
    assert (count, ids) == (300, 300)


def test_two_rounds_order_as_in_the_paper(tmp_path, ray_session):
    """2-RF's one-step samples are much closer to its flow's and to π1 than 1-RF's; its paths are
    straighter and cross no more (toy flows trained briefly, so margins, not values)."""
    first, second, _ = toy_flows()
    root = location(str(tmp_path))
    settings = config(samples=400, ot_samples=200, samplers=["euler@1", "rk45@1e-3"], trajectories=0)
    rows = {}
    for k, model in ((1, first), (2, second)):
        write_teacher(root.join(f"train-{k}"), model, stage_hash=f"round{k}")
        subject = EvalSubject(name=f"train-{k}", label=f"{k}-RF", family="rectified", round=k)
        manifest = run_eval_stage(settings, subject, root.join(f"train-{k}"), root.join(f"eval-{k}"))
        rows[k] = {row["sampler"]: row for row in manifest.details["rows"]}
        rows[k]["independent"] = manifest.details["independent"]

    one_step, fine = "euler@1", "rk45@0.001"
    assert rows[2][one_step]["one_step_distance"] < 0.3 * rows[1][one_step]["one_step_distance"]
    assert rows[2][one_step]["w2"] < 0.6 * rows[1][one_step]["w2"]
    assert rows[2][one_step]["mmd2"] < rows[1][one_step]["mmd2"]
    assert rows[2][fine]["crossing_pct"] <= rows[1][fine]["crossing_pct"] + 0.25
    assert rows[2][fine]["straightness"] < rows[1][fine]["straightness"]
    assert rows[2][fine]["nfe_mean"] < rows[1][fine]["nfe_mean"]
    for k in (1, 2):
        assert rows[k][fine]["pairing_ratio"] >= 1 - 1e-9 and rows[k][fine]["pairing_ratio"] < 1.01
        assert rows[k][fine]["transport_cost"] == pytest.approx(20.0, rel=0.05)
    assert rows[1]["independent"] == rows[2]["independent"]  # the same Z0 and π1 sample for every model


@pytest.mark.parametrize(
    "spoil, shape, message",
    [
        (lambda model: model.delete(), [2], r"model .* is not a finished stage"),
        (break_weights, [2], "not a valid safetensors file"),
        (drop_hash, [2], "is not a stage manifest: it has no hash"),
        (lambda model: None, [3], r"takes inputs of shape \[2\], but pi0 draws samples of shape \[3\]"),
    ],
)
def test_a_bad_model_is_refused_and_nothing_is_written(storage_root, spoil, shape, message):
    root = location(storage_root)
    model, output = root.join("train-1"), root.join("eval")
    write_teacher(model, random_mlp())
    spoil(model)
    noise = NoiseSpec(shape=shape)
    with pytest.raises(EvalError, match=message):
        run_eval_stage(config(pi0=noise, pi1=noise), SUBJECT, model, output)
    assert output.list_names() == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"samplers": []}, "at least one sampler"),
        ({"samplers": ["rk4@10"]}, "not of the form euler@N"),
        ({"samplers": ["rk45@1e-5", "rk45@0.00001"]}, r"samplers repeat \['rk45@1e-05'\]"),
        ({"reference_solver": "euler"}, "not of the form"),
        ({"samples": 1}, "samples"),
        ({"ot_samples": 400}, r"ot_samples \(400\) must be <= samples \(300\)"),
        ({"trajectories": 301}, r"trajectories \(301\) must be <= samples \(300\)"),
        ({"workers": 0}, "workers"),
        ({"pi1": NoiseSpec(shape=[3])}, r"pi0 has shape \[2\] but pi1 has shape \[3\]"),
        ({"samplers": ["euler@1", "sde@100"]}, r"samplers \['sde@100'\] need pi0 to be Gaussian noise"),
        ({"reference_solver": "sde@100"}, "the reference solve must be deterministic"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValidationError, match=message):
        config(**overrides)


def test_settings_defaults_identity_and_subject():
    settings = EvalSettings()
    assert settings.samplers == ["euler@1", "euler@2", "euler@5", "euler@100", "rk45@1e-05"]
    assert (settings.samples, settings.ot_samples, settings.reference_solver) == (2000, 1000, "rk45@1e-05")
    base = config()
    faster = base.model_copy(update={"workers": 4, "cpus_per_worker": 2.0, "gpus_per_worker": 1.0})
    assert faster.identity() == base.identity() and "workers" not in base.identity()
    assert (
        eval_stage_hash(faster, SUBJECT, "m")
        == eval_stage_hash(base, SUBJECT, "m")
        != eval_stage_hash(base, SUBJECT, "n")
    )
    assert config(samplers=["euler@1"]).solvers == ["euler@1", "rk45@0.001"]
    relabelled = SUBJECT.model_copy(update={"label": "first"})
    assert eval_stage_hash(base, relabelled, "m") != eval_stage_hash(base, SUBJECT, "m")
    with pytest.raises(ValidationError, match="family"):
        EvalSubject(name="train-1", label="x", family="other")


def test_sde_samplers_do_not_depend_on_workers_or_blocks(tmp_path, ray_session, monkeypatch):
    """The SDE's noise is keyed by (seed, sample id, step): the same samples whatever the blocks
    and workers; with σ = 0 it is Euler exactly."""
    root = location(str(tmp_path))
    model = root.join("train-1")
    write_teacher(model, random_mlp())
    gaussian = NoiseSpec(shape=[2])
    settings = dict(pi0=gaussian, samplers=["euler@4", "sde@4", "sde@4:0"], reference_solver="euler@4", trajectories=0)
    run_eval_stage(config(workers=1, **settings), SUBJECT, model, root.join("one"))
    monkeypatch.setattr(evaluate, "_blocks", lambda samples, size: _blocks_of(samples, 64))
    run_eval_stage(config(workers=2, **settings), SUBJECT, model, root.join("two"))
    one, two = (pd.read_parquet(stage_file(root.join(name), "samples.parquet").path) for name in ("one", "two"))
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    ends = {name: np.stack(one.loc[one["sampler"] == name, "x1"].to_list()) for name in ("euler@4", "sde@4", "sde@4:0")}
    np.testing.assert_array_equal(ends["sde@4:0"], ends["euler@4"])
    assert np.abs(ends["sde@4"] - ends["euler@4"]).mean() > 0.1
    rows = rows_by_sampler(root.join("one"))
    assert rows["sde@4"]["nfe_mean"] == rows["sde@4"]["nfe_max"] == 4
    # a reflow model was trained on coupled pairs: its velocity gives no score, so no SDE rows
    reflow = EvalSubject(name="train-2", label="2-RF", family="rectified", round=2)
    manifest = run_eval_stage(config(workers=1, **settings), reflow, model, root.join("reflow"))
    assert list(rows_by_sampler(root.join("reflow"))) == ["euler@4"]
    assert set(manifest.details["skipped_samplers"]) == {"sde@4", "sde@4:0"}


def test_rows_equal_a_plain_in_process_evaluation(tmp_path, ray_session):
    """The stage computes nothing differently from a plain loop over all M samples in one process
    (the evaluation as it was before it moved into workers): every number agrees to float
    summation order (relative 1e-12) — the workers only change where the work happens."""
    from rf.metrics import coupling_metrics, straightness_per_sample, vector_quality

    first, _, _ = toy_flows()
    root = location(str(tmp_path))
    write_teacher(root.join("train-1"), first, stage_hash="round1")
    settings = config(samples=400, ot_samples=200, samplers=["euler@1", "euler@4"], trajectories=0)
    manifest = run_eval_stage(settings, SUBJECT, root.join("train-1"), root.join("eval"))
    ids = np.arange(400)
    x0 = sample_by_id(TOY_PI0, settings.seed, ids)
    reference = sample_by_id(TOY_PI1, settings.seed + 1, ids)
    fine = generate_pairs(first, Solver.parse("rk45@1e-3"), x0).x1
    assert manifest.details["independent"] == pytest.approx(coupling_metrics(x0, reference, 200), rel=1e-12)
    for row in manifest.details["rows"]:
        solution = Solver.parse(row["sampler"]).solve(lambda x, t: first(x, t), x0, return_trajectory=True)
        x1 = solution.x.detach()
        expected = {
            **coupling_metrics(x0, x1, 200),
            **vector_quality(x1[:200], reference[:200]),
            "straightness": float(straightness_per_sample(solution.trajectory).double().mean()),
            "one_step_distance": float((x1.double() - fine.double()).norm(dim=1).mean()),
        }
        assert {key: row[key] for key in expected} == pytest.approx(expected, rel=1e-12, abs=1e-12), row["sampler"]
