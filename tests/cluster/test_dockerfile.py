"""``cluster/Dockerfile``, checked statically (no container engine here): its base image is the Ray
release and Python the deployment files name, every dependency of pyproject.toml is pinned inside
its bounds, torch is a CUDA build from the PyTorch index, the project itself is copied and
installed, and nothing in it is a credential."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.cluster.test_deployment import credential_problems

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments dropped, ``\\`` continuations joined."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(item.split(None, 1)[0].upper(), item.split(None, 1)[1] if " " in item else "") for item in logical]


def build_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The ``ARG NAME=default`` values."""
    return dict(argument.split("=", 1) for name, argument in steps if name == "ARG" and "=" in argument)


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def pip_installs(steps: list[tuple[str, str]]) -> list[list[str]]:
    """The words of each ``pip install`` command of the RUN steps (ARGs expanded)."""
    args, found = build_args(steps), []
    for name, argument in steps:
        if name != "RUN":
            continue
        lexer = shlex.shlex(expand(argument, args), posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word in (";", "&&", "||", "|"):
                if command[:2] == ["pip", "install"]:
                    found.append(command[2:])
                command = []
            else:
                command.append(word)
    return found


def pins(steps: list[tuple[str, str]]) -> dict[str, Requirement]:
    """Every requirement the image installs, by canonical name."""
    return {
        canonicalize_name(requirement.name): requirement
        for words in pip_installs(steps)
        for word in words
        if not word.startswith(("-", "/", ".", "http")) and "==" in word
        for requirement in [Requirement(word)]
    }


def pinned_version(requirement: Requirement) -> Version:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"{requirement} is not an exact pin"
    return Version(specifier.version)


def pin_problems(steps: list[tuple[str, str]], dependencies: list[str]) -> list[str]:
    """pyproject dependencies the image does not pin exactly, or pins outside their bounds."""
    installed, problems = pins(steps), []
    for dependency in map(Requirement, dependencies):
        pin = installed.get(canonicalize_name(dependency.name))
        if pin is None:
            problems.append(f"{dependency.name} is not pinned")
        elif not dependency.specifier.contains(pinned_version(pin), prereleases=True):
            problems.append(f"{pin} is outside pyproject's {dependency}")
        elif not dependency.extras <= pin.extras:
            problems.append(f"{pin} lacks the extras of {dependency}")
    return problems


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_base_image_is_the_ray_release_and_python_the_cluster_files_name(steps, project):
    (base,) = [argument for name, argument in steps if name == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", base)
    assert match, base
    ray_version, python = match.group(1), f"3.{match.group(2)}"
    assert SpecifierSet(project["requires-python"]).contains(python)
    ray_versions = {
        doc["spec"].get("rayVersion") or doc["spec"]["rayClusterSpec"]["rayVersion"]
        for path in (ROOT / "cluster" / "kuberay").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") in ("RayJob", "RayCluster")
    }
    assert ray_versions == {ray_version}
    assert pinned_version(pins(steps)["ray"]) == Version(ray_version)


def test_every_dependency_is_pinned_within_pyprojects_bounds(steps, project):
    assert pin_problems(steps, project["dependencies"]) == []
    installed = pins(steps)
    storage = {name: pinned_version(installed[name]) for name in ("fsspec", "s3fs", "gcsfs")}
    assert len(set(storage.values())) == 1, f"fsspec, s3fs and gcsfs require each other's version: {storage}"


def test_the_pin_check_finds_what_is_wrong():
    steps = instructions('FROM x\nRUN pip install "numpy==1.20.0" \\\n  "ray[default]==2.60.0" scipy\n')
    problems = pin_problems(steps, ["numpy>=1.24", "ray[data,train,default]>=2.52", "scipy>=1.10", "pillow>=10"])
    assert problems == [
        "numpy==1.20.0 is outside pyproject's numpy>=1.24",
        "ray[default]==2.60.0 lacks the extras of ray[data,default,train]>=2.52",
        "scipy is not pinned",
        "pillow is not pinned",
    ]


def test_torch_is_a_cuda_build_from_the_pytorch_index(steps):
    args = build_args(steps)
    torch = pins(steps)["torch"]
    version = pinned_version(torch)
    assert version.local and re.fullmatch(r"cu1[23]\d", version.local), f"{torch}: not a CUDA build"
    index = [words for words in pip_installs(steps) if str(torch) in words and "--index-url" in words]
    assert index and index[0][index[0].index("--index-url") + 1] == f"https://download.pytorch.org/whl/{version.local}"
    # the version the test suite runs, as the Dockerfile says
    makefile = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert makefile and version.public == makefile.group(1) == args["TORCH_VERSION"]


def test_the_project_is_copied_and_installed(steps):
    copied = {
        source
        for name, argument in steps
        if name == "COPY"
        for source in [word for word in shlex.split(argument) if not word.startswith("--")][:-1]
    }
    assert {"pyproject.toml", "README.md", "rf", "workflows"} <= copied
    assert all((ROOT / source).exists() for source in copied), copied
    destinations = {shlex.split(argument)[-1].rstrip("/") for name, argument in steps if name == "COPY"}
    installs = [words for words in pip_installs(steps) if any(word.rstrip("/") in destinations for word in words)]
    assert installs, "no pip install of the copied project"
    runs = " ".join(argument for name, argument in steps if name == "RUN")
    assert "rectiflow --version" in runs, "the build does not check that the installed command runs"


def test_no_secrets_in_the_image(steps):
    text = DOCKERFILE.read_text()
    assert credential_problems(text) == []
    secret = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
    assert not [argument for name, argument in steps if name in ("ENV", "ARG") and secret.search(argument)]
    copied = " ".join(argument for name, argument in steps if name in ("COPY", "ADD"))
    assert not re.search(r"\.aws|\.ray|auth_token|\.ssh|\.env\b|\.netrc|id_rsa", copied), copied
