"""The pipeline file is validated completely, before anything runs, with one line per bad field."""

import copy
import glob
import os

import pytest
import yaml

from workflows.config import ConfigError, load_pipeline, parse_pipeline

TOY = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "toy2d.yaml")


def base() -> dict:
    with open(TOY) as handle:
        return yaml.safe_load(handle)


def test_the_embedded_default_is_valid():
    config = load_pipeline(TOY)
    assert config.name == "toy2d" and config.rounds == 3
    assert config.round_settings(2).steps == 2000 and config.round_settings(1).steps == 3000
    assert config.distill_settings(config.distill[0]).steps == 2000


def test_overrides_apply_before_validation(tmp_path):
    config = load_pipeline(TOY, ["train.steps=50", "couple.solver=euler@10", "distill.0.k=2"], storage=str(tmp_path))
    assert config.train.steps == 50 and config.couple.solver == "euler@10" and config.distill[0].k == 2
    assert config.storage == str(tmp_path)


def mutate(path: str, value):
    def apply(document):
        *parents, last = path.split(".")
        target = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
        if value is DELETE:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
        return document

    return apply


DELETE = object()

BAD = [
    # (what is changed, the message that must name the problem)
    (mutate("rounds", 0), "rounds: Input should be greater than or equal to 1"),
    (mutate("rounds", "three"), "rounds: Input should be a valid integer"),
    (mutate("rounds", 11), "rounds: Input should be less than or equal to 10"),
    (mutate("train.steps", -5), "train.steps: Input should be greater than 0"),
    (mutate("train.steps", 0), "train.steps: Input should be greater than 0"),
    (mutate("train.lr", 0), "train.lr: Input should be greater than 0"),
    (mutate("train.ema_decay", 1.0), "train.ema_decay: Input should be less than 1"),
    (mutate("train", {"batch_size": 255, "workers": 2}), "train: batch_size (255) must be a multiple of workers (2)"),
    (mutate("train.workers", 0), "train.workers: Input should be greater than 0"),
    (mutate("train.learning_rate", 0.1), "train.learning_rate: unknown key"),
    (mutate("train.loss", {"name": "l1"}), "train.loss: unknown loss 'l1'"),
    (mutate("colour", "blue"), "colour: unknown key"),
    (mutate("name", "../escape"), "name: '../escape' is not a plain name"),
    (mutate("name", "/abs/path"), "name: '/abs/path' is not a plain name"),
    (mutate("name", "a/b"), "name: 'a/b' is not a plain name"),
    (mutate("name", DELETE), "name: Field required"),
    (mutate("storage", "s3://KEY:secret@bucket/x"), "storage: storage URI s3://…@bucket embeds credentials"),
    (mutate("storage", "nosuch://bucket/x"), "storage: storage URI 'nosuch://bucket/x': unknown protocol"),
    (mutate("storage", "s3://"), "storage: storage URI 's3://' has no bucket"),
    (mutate("pi0", {"kind": "noise", "shape": [3]}), "pi0 has shape [3] but the model takes [2]"),
    (mutate("pi1", {"kind": "noise", "shape": [0]}), "pi1.noise.shape: shape must be a non-empty list"),
    (mutate("pi0", {"kind": "toy", "name": "spiral"}), "unknown toy distribution 'spiral'"),
    (mutate("pi0", {"kind": "pictures"}), "pi0: Input tag 'pictures' found using 'kind' does not match"),
    (mutate("model", {"kind": "resnet"}), "model.kind: Input should be 'mlp' or 'unet'"),
    (mutate("model.config", {"dim": 2, "widht": 3}), "bad options for model kind 'mlp'"),
    (mutate("path", "curvy"), "path: Input should be 'straight', 'vp', 'subvp' or 'vp_const'"),
    (mutate("distill.0", {"k": 1}), "give exactly one of from_round (a reflow round) or from_baseline"),
    (mutate("distill.0", {"from_baseline": "vp"}), "from_baseline vp is not in baselines []"),
    (mutate("baselines", ["vp", "vp"]), "baselines repeat"),
    (mutate("time_sampler", {"name": "beta"}), "unknown time sampler 'beta'"),
    (mutate("couple.pairs", 0), "couple.pairs: Input should be greater than 0"),
    (mutate("couple.shard_size", 50000), "couple: shard_size (50000) is larger than pairs (20000)"),
    (mutate("couple.solver", "rk4@10"), "couple.solver: solver 'rk4@10' is not of the form"),
    (mutate("couple.dtype", "uint8"), "couple: dtype uint8 stores x1 only"),
    (mutate("couple", DELETE), "couple: missing"),
    (mutate("distill.0.from_round", 5), "from_round 5 > rounds 3"),
    (mutate("distill.0.k", 0), "distill.0.k: Input should be greater than 0"),
    (mutate("distill.0.train", {"steps": -1}), "distill distill-1: train.steps: Input should be greater than 0"),
    (mutate("round_train", {7: {"steps": 10}}), "round_train has round 7, but rounds is 3"),
    (mutate("round_train", {2: {"stepz": 10}}), "round_train.2.stepz: unknown key"),
    (mutate("evaluate.samplers", []), "evaluate.samplers: list at least one sampler"),
    (mutate("evaluate.samplers", ["euler@0"]), "evaluate.samplers: solver 'euler@0': euler needs steps >= 1"),
    (mutate("evaluate.samplers", ["sde@100"]), "evaluate.samplers: ['sde@100'] need pi0 to be Gaussian noise"),
    (
        mutate("evaluate.classifier", {"steps": 10}),
        "evaluate.classifier: measures images, but pi1 is not of kind images",
    ),
    (mutate("pi1", {"kind": "images", "shape": [2]}), "shape must be"),
    (mutate("pi1", {"kind": "images", "shape": [1, 8, 8]}), "give exactly one of uri"),
    (mutate("evaluate.samples", 1), "evaluate.samples: Input should be greater than 1"),
    (mutate("reflow", "sometimes"), "reflow: Input should be 'stored' or 'online'"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[message[:40] for _, message in BAD])
def test_malformed_pipelines_name_the_field(change, message, tmp_path):
    document = change(copy.deepcopy(base()))
    document["storage"] = (
        document.get("storage", str(tmp_path)) if "storage" in str(message) else str(tmp_path / "store")
    )
    with pytest.raises(ConfigError) as error:
        parse_pipeline(document, source="pipeline.yaml")
    assert message in str(error.value)
    assert not os.path.exists(tmp_path / "store"), "validation wrote something"


def test_all_problems_are_reported_at_once(tmp_path):
    document = base()
    document["rounds"] = 0
    document["train"]["lr"] = -1
    document["typo"] = 1
    with pytest.raises(ConfigError) as error:
        parse_pipeline(document)
    assert len(error.value.errors) == 3


def test_unreadable_files_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_pipeline(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_pipeline(listy)


def test_yaml_is_loaded_safely(tmp_path):
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(hostile)
    assert not os.path.exists("pwned")


def test_bad_overrides():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_pipeline(TOY, ["train.steps"])
    with pytest.raises(ConfigError, match="train.steps.x: steps is not a mapping or a list"):
        load_pipeline(TOY, ["train.steps.x=3"])
    with pytest.raises(ConfigError, match="distill.4.k: 4 is not an index of a list of 3"):
        load_pipeline(TOY, ["distill.4.k=3"])


def test_the_identity_rule_leaves_out_exactly_the_neutral_fields():
    """Every field counts toward a stage's hash unless it is declared neutral (resources, logging,
    checkpoint cadence); nested settings follow the same rule."""
    from workflows.plan import build_plan
    from workflows.settings import TrainSettings
    from workflows.settings.base import _NEUTRAL

    neutral = {
        name for name, field in TrainSettings.model_fields.items() if (field.json_schema_extra or {}).get(_NEUTRAL)
    }
    assert neutral == {"cpus_per_worker", "checkpoint_every", "max_failures", "log_every"}
    assert set(TrainSettings().identity()) == set(TrainSettings.model_fields) - neutral
    assert set(TrainSettings().identity()["input"]) == {"window_mb"}  # the shuffle window decides the order
    plans = {
        key: build_plan(load_pipeline(TOY, [f"{key}"]))
        for key in (
            "train.log_every=7",
            "train.cpus_per_worker=3",
            "couple.workers=1",
            "evaluate.workers=2",
            "train.input.readers=3",
            "train.lr=0.002",
            "couple.solver=euler@3",
        )
    }
    base = build_plan(load_pipeline(TOY))
    for key in (
        "train.log_every=7",
        "train.cpus_per_worker=3",
        "couple.workers=1",
        "evaluate.workers=2",
        "train.input.readers=3",
    ):
        assert plans[key].key == base.key, key  # resources and logging never change what runs
    assert plans["train.lr=0.002"].stages["train-1"].hash != base.stages["train-1"].hash
    changed = {
        name for name, stage in plans["couple.solver=euler@3"].stages.items() if stage.hash != base.stages[name].hash
    }
    assert "train-1" not in changed and {"couple-1", "train-2", "report"} <= changed


def test_micro_batches_below_the_floor_warn_on_gpus():
    from workflows.config import config_warnings

    assert config_warnings(load_pipeline(TOY)) == []  # CPU only
    lsun = os.path.join(os.path.dirname(TOY), "lsun_church256.yaml")
    small = load_pipeline(lsun, ["train.workers=64", "train.batch_size=64", "train.gpus_per_worker=1"])
    warnings = config_warnings(small)
    assert warnings and "a micro-batch of 1 per GPU" in warnings[0] and "below 16" in warnings[0]
    shipped = glob.glob(os.path.join(os.path.dirname(TOY), "*.yaml"))
    assert len(shipped) >= 10
    for path in shipped:  # every shipped config keeps its GPUs at 16 examples or more
        assert config_warnings(load_pipeline(path)) == [], path
    scaled = load_pipeline(lsun, ["train.workers=64", "train.batch_size=1024"])
    assert scaled.train.micro_batch == 16 and config_warnings(scaled) == []


@pytest.mark.parametrize("command", ["validate", "status", "report"])
def test_the_front_door_imports_neither_ray_nor_torch(command, tmp_path):
    """``rectiflow validate``, ``status`` and ``report`` work from storage and the file alone."""
    import subprocess
    import sys

    argument = TOY if command == "validate" else str(tmp_path)
    script = (
        "import sys\n"
        "from workflows.cli import main\n"
        f"code = main([{command!r}, {argument!r}])\n"
        "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
