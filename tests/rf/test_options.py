"""The torch-free option checks of rf.options: importable without torch, the same names and the
same errors as the torch classes built on them."""

import subprocess
import sys

import pytest

from rf.models import MODELS, build_model, input_shape
from rf.options.models import MODEL_OPTIONS, model_options
from rf.options.solvers import SolverSpec
from rf.options.timesteps import TIME_SAMPLER_OPTIONS, time_sampler_options
from rf.options.toy import TOY_OPTIONS, toy_options
from rf.solvers import Solver
from rf.timesteps import TIME_SAMPLERS, make_time_sampler
from rf.toy import TOYS, make_toy


def test_the_options_import_no_torch():
    script = (
        "import sys\nimport rf.options.models, rf.options.solvers, rf.options.timesteps, rf.options.toy, "
        "rf.options.losses\nprint('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_every_option_name_has_exactly_its_torch_class():
    assert set(TOYS) == set(TOY_OPTIONS) and set(TIME_SAMPLERS) == set(TIME_SAMPLER_OPTIONS)
    assert set(MODELS) == set(MODEL_OPTIONS)
    for name, cls in TOYS.items():
        assert issubclass(cls, TOY_OPTIONS[name])
    for name, cls in TIME_SAMPLERS.items():
        assert issubclass(cls, TIME_SAMPLER_OPTIONS[name])


@pytest.mark.parametrize(
    "kind, config",
    [
        ("mlp", {"dim": 3, "width": 8}),
        (
            "unet",
            {
                "in_channels": 1,
                "resolution": 8,
                "base_channels": 8,
                "channel_mult": [1, 2],
                "num_res_blocks": 1,
                "attn_resolutions": [4],
                "num_groups": 2,
            },
        ),
    ],
)
def test_model_options_describe_the_built_model(kind, config):
    options = model_options(kind, config)
    model = build_model(kind, config)
    assert model.config() == options.as_dict() and input_shape(model) == options.input_shape


@pytest.mark.parametrize(
    "check, build, bad, message",
    [
        (model_options, build_model, ("unet", {"resolution": 10, "channel_mult": [1, 2, 2]}), "must be divisible by"),
        (model_options, build_model, ("unet", {"attn_resolutions": [3]}), "never reaches"),
        (model_options, build_model, ("mlp", {"widht": 3}), "bad options for model kind 'mlp'"),
        (
            lambda n, o: time_sampler_options(n, **o),
            lambda n, o: make_time_sampler(n, **o),
            ("logit_normal", {"std": 0}),
            "std must be positive",
        ),
        (
            lambda n, o: toy_options(n, **o),
            lambda n, o: make_toy(n, **o),
            ("gaussian_mixture", {"centers": [[0, 0]], "scales": [1, 2]}),
            "one scale and one weight per centre",
        ),
    ],
)
def test_the_same_error_without_and_with_torch(check, build, bad, message):
    with pytest.raises(ValueError, match=message):
        check(*bad)
    with pytest.raises(ValueError, match=message):
        build(*bad)


def test_solver_names_parse_the_same():
    for text in ("euler@10", "heun@3", "rk45@1e-5", "sde@2000:0.5"):
        assert SolverSpec.parse(text).name == Solver.parse(text).name
    assert isinstance(Solver.parse("euler@2"), Solver)
    with pytest.raises(ValueError, match="not of the form"):
        SolverSpec.parse("rk4@10")
