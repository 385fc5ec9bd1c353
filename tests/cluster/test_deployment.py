"""The deployment text under ``cluster/``: every YAML parses and has what its kind needs (the
KubeRay objects against a hand-written schema of the fields they use, the launcher configs against
Ray's own schema), every node runs the rectiflow image and nothing installs an unpublished
rectiflow, every ``rectiflow`` command in it (and in the guide's code) is accepted by the real
CLI, every pipeline key it names exists, and nothing in it looks like a credential."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from workflows.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
GUIDE = CLUSTER / "README.md"
YAML_FILES = sorted(path for path in CLUSTER.rglob("*") if path.suffix in (".yaml", ".yml"))
TEXT_FILES = [*YAML_FILES, GUIDE]
EXPECTED = {
    "kuberay/rayjob.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/serviceaccount.yaml",
    "launcher/aws.yaml",
    "launcher/gcp.yaml",
    "runtime_env.yaml",
}
AWS_GPU_FAMILIES = {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5", "p5e"}
IMAGE = "YOUR-REGISTRY/rectiflow:0.1.0"
"""The image users build from cluster/Dockerfile, which every node of these files runs."""


def _ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(CLUSTER)) for path in paths]


def _documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _by_kind(kind: str) -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in YAML_FILES
        for doc in _documents(path)
        if isinstance(doc, dict) and doc.get("kind") == kind
    ]


def _launchers() -> list[tuple[Path, dict]]:
    return [
        (path, doc) for path in YAML_FILES for doc in _documents(path) if isinstance(doc, dict) and "provider" in doc
    ]


# --- finding commands -------------------------------------------------------------------------

# A command starts a (comment-stripped) line, follows `--` (ray job submit … -- rectiflow …),
# `&&`, `;` or `entrypoint:`, possibly after VAR=value prefixes; it ends at # ; & | or a backtick.
# `python -m workflows.cli …` (how a submitted job runs it) counts as `rectiflow …`.
_COMMAND = re.compile(
    r"(?:^|\s--\s|&&|;|\bentrypoint:)\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
    r"((?:rectiflow|python3? -m workflows\.cli)\s[^#;&|`]*)"
)
_MODULE_RUN = re.compile(r"^python3? -m workflows\.cli\s")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"(?<!`)`(rectiflow\s[^`]+)`(?!`)")


def commands_in(text: str, markdown: bool) -> list[str]:
    """The ``rectiflow …`` command lines of a YAML file (values, and comments indented by two or
    more spaces after ``#``: ``#   rectiflow submit …``; ``# rectiflow on AWS`` is prose) or of a
    Markdown file's fenced code blocks."""
    if markdown:
        blocks = [match.group(1) for match in _FENCE.finditer(text)]
    else:
        blocks = [text]
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not markdown and line.startswith("#"):
                if not line.startswith("#  "):
                    continue
                line = line.lstrip("#")
            line = line.strip().removeprefix("$ ").removeprefix("- ").strip()
            found += [_MODULE_RUN.sub("rectiflow ", match.group(1).strip()) for match in _COMMAND.finditer(line)]
    return found


def _file_commands() -> list[tuple[str, str]]:
    return [
        (str(path.relative_to(CLUSTER)), command)
        for path in TEXT_FILES
        for command in commands_in(path.read_text(), path.suffix == ".md")
    ]


def _command_params() -> list:
    return [pytest.param(name, command, id=f"{name}:{index}") for index, (name, command) in enumerate(_file_commands())]


def _subparsers() -> dict[str, Any]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


def option_problems(words: list[str]) -> list[str]:
    """The subcommand and ``--options`` of ``rectiflow …`` words that the CLI does not define
    exactly (argparse would also take a prefix such as ``--storag``)."""
    top, subparsers = set(build_parser()._option_string_actions), _subparsers()
    rest = words[1:]
    while rest and rest[0] in top:
        rest = rest[1:]
    if not rest or rest[0] not in subparsers:
        return [f"{' '.join(words)!r}: no subcommand {rest[0] if rest else ''!r}"]
    options = set(subparsers[rest[0]]._option_string_actions)
    return [
        f"{' '.join(words)!r}: {word} is not an option of {rest[0]}"
        for word in rest[1:]
        if word.startswith("-") and word.split("=")[0] not in options
    ]


def parse_command(command: str):
    """The CLI's namespace for ``command``; a usage error, or an option that is only a prefix of
    a real one, becomes an AssertionError."""
    argv = shlex.split(command)
    assert argv[0] == "rectiflow", command
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as error:
        raise AssertionError(f"the CLI rejects {command!r} (exit {error.code})") from None
    problems = option_problems(argv)
    if problems:
        raise AssertionError(f"the CLI rejects {problems}")
    return args


def inline_problems(text: str) -> list[str]:
    """Inline ``rectiflow SUB …`` spans in prose (often fragments): the subcommand and every
    option must exist."""
    return [
        problem
        for match in _INLINE.finditer(_FENCE.sub("", text))
        for problem in option_problems(match.group(1).split())
    ]


# --- pipeline keys (read from the source, without importing torch) --------------------------


def _classes() -> dict[str, ast.ClassDef]:
    classes = {}
    for path in (ROOT / "workflows").rglob("*.py"):
        classes.update(
            {node.name: node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)}
        )
    return classes


def _class_fields(name: str, classes: dict[str, ast.ClassDef]) -> set[str]:
    """The annotated fields of class ``name`` and of its bases defined in workflows/."""
    node = classes[name]
    fields = {
        item.target.id for item in node.body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
    }
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            fields |= _class_fields(base.id, classes)
    return fields


@functools.lru_cache(maxsize=1)
def pipeline_schema() -> dict[str, set[str] | None]:
    """Top-level pipeline keys of ``PipelineConfig``; for a section typed by a settings class of
    workflows/ (``train: TrainSettings``), the set of its keys, else None."""
    classes = _classes()
    schema: dict[str, set[str] | None] = {}
    for item in classes["PipelineConfig"].body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names = {n.id for n in ast.walk(item.annotation) if isinstance(n, ast.Name)} & set(classes)
            schema[item.target.id] = set().union(*(_class_fields(n, classes) for n in names)) if names else None
    return schema


def key_problems(keys: list[str]) -> list[str]:
    """Dotted pipeline keys (``train.workers``) that the config schema does not have."""
    schema, problems = pipeline_schema(), []
    for key in keys:
        section, _, rest = key.partition(".")
        if section not in schema:
            problems.append(f"{key}: no top-level key {section!r}")
        elif rest and schema[section] is not None and rest.split(".")[0] not in schema[section]:
            problems.append(f"{key}: {section} has no key {rest.split('.')[0]!r}")
    return problems


# --- credentials -----------------------------------------------------------------------------

_CREDENTIAL_TEXT = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"aws_secret_access_key|aws_session_token", re.I),
    re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*[\"']?(?![\"'$\s])\S"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
_SECRET_NAME = re.compile(r"^[A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|ACCESS_KEY)(?:_[A-Z0-9]+)*$")


def _secret_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_SECRET_NAME.match(name)) and not name.endswith(("_PATH", "_FILE"))


def _mappings(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _mappings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _mappings(value)


def credential_problems(text: str, documents: list[Any] = ()) -> list[str]:
    """Literal credentials in ``text``, or secret-named variables given a literal value in the
    parsed ``documents`` (``{name: X_TOKEN, value: …}`` or ``X_SECRET: …``)."""
    problems = [f"text matches {pattern.pattern!r}" for pattern in _CREDENTIAL_TEXT if pattern.search(text)]
    for mapping in _mappings(list(documents)):
        if _secret_name(mapping.get("name")) and "value" in mapping:
            problems.append(f"env var {mapping['name']} has a literal value")
        problems += [
            f"{key} has a literal value"
            for key, value in mapping.items()
            if _secret_name(key) and isinstance(value, (str, int))
        ]
    return problems


def _all_documents(path: Path) -> list[Any]:
    """A file's documents, plus the runtime envs embedded as YAML strings."""
    documents = _documents(path)
    return documents + [
        yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        for doc in documents
        if isinstance(doc, dict) and doc.get("kind") == "RayJob"
    ]


# --- tests -----------------------------------------------------------------------------------


def test_the_deployment_files_exist():
    assert EXPECTED <= set(_ids(YAML_FILES)), EXPECTED - set(_ids(YAML_FILES))
    assert (CLUSTER / "Dockerfile").is_file()
    assert GUIDE.is_file() and len(GUIDE.read_text().splitlines()) <= 140


@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_every_yaml_parses_and_every_document_has_a_known_kind(path):
    documents = _documents(path)
    assert documents, f"{path} is empty"
    for doc in documents:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        known = doc.get("kind") in ("RayJob", "RayCluster", "ServiceAccount") or "provider" in doc
        assert known or path.name == "runtime_env.yaml", f"{path}: unrecognised document {sorted(doc)}"


# --- images and installs ---------------------------------------------------------------------


def _is_rectiflow(word: str) -> bool:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return Requirement(word).name.lower() == "rectiflow"
    except InvalidRequirement:
        return False


def install_problems(text: str) -> list[str]:
    """Installs of the unpublished ``rectiflow`` package: a pinned ``rectiflow==…`` anywhere, or
    a ``pip install`` line with a ``rectiflow`` argument (``pip install .`` is a checkout)."""
    problems = [
        f"pins an unpublished package: {match.group(0)!r}"
        for match in re.finditer(r"\brectiflow\s*(?:==|>=|~=)\s*[\d.]+", text)
    ]
    for line in text.splitlines():
        if "pip install" in line:
            words = shlex.split(line.split(" #")[0], posix=True)
            problems += [f"pip-installs rectiflow: {line.strip()!r}" for word in words if _is_rectiflow(word)]
    return problems


def _images(node: Any) -> list[str]:
    """Every container image a document names (pod containers, the launcher's docker section)."""
    found = []
    for mapping in _mappings(node):
        found += [
            value
            for key, value in mapping.items()
            if key in ("image", "head_image", "worker_image") and isinstance(value, str)
        ]
    return found


@pytest.mark.parametrize("path", TEXT_FILES, ids=_ids(TEXT_FILES))
def test_nothing_installs_an_unpublished_rectiflow(path):
    assert install_problems(path.read_text()) == []


def test_the_install_check_finds_them():
    assert install_problems("pip:\n  - rectiflow==0.1.0\n")
    assert install_problems('- pip install -U "ray[default]==2.60.0" "rectiflow==0.1.0" gcsfs')
    assert install_problems("pip install rectiflow")
    assert not install_problems("pip install . # installs rectiflow from the checkout")
    assert not install_problems("image: YOUR-REGISTRY/rectiflow:0.1.0")


def test_every_node_runs_the_rectiflow_image():
    from workflows import __version__

    assert IMAGE.endswith(f":{__version__}"), "the image tag is rectiflow's version"
    for path, doc in _by_kind("RayJob") + _by_kind("RayCluster") + _launchers():
        images = _images(doc)
        assert images and set(images) == {IMAGE}, f"{path}: runs {images}"
    for path in [CLUSTER / "runtime_env.yaml", GUIDE]:
        assert IMAGE in path.read_text() or "Dockerfile" in path.read_text(), f"{path} does not name the image"


# --- runtime envs ----------------------------------------------------------------------------


def _runtime_env_problems(env: Any) -> list[str]:
    """A runtime env that Ray accepts and that does not install rectiflow."""
    from ray.runtime_env import RuntimeEnv

    if not isinstance(env, dict):
        return [f"the runtime env is a {type(env).__name__}, not a mapping"]
    unknown = set(env) - set(RuntimeEnv.known_fields)
    if unknown:
        return [f"unknown runtime env keys {sorted(unknown)}"]
    RuntimeEnv(**env)  # type checks (env_vars values must be strings, …)
    return install_problems(yaml.safe_dump(env))


def test_runtime_env_file_is_one_rectiflow_submit_accepts():
    from workflows.jobs import load_runtime_env

    (doc,) = _documents(CLUSTER / "runtime_env.yaml")
    assert load_runtime_env(str(CLUSTER / "runtime_env.yaml")) == doc  # what --runtime-env checks
    assert _runtime_env_problems(doc) == []
    assert _runtime_env_problems({**doc, "pipp": ["x"]}), "an unknown key must be reported"
    assert _runtime_env_problems({**doc, "pip": ["rectiflow==0.1.0"]}), "installing rectiflow must be reported"


# --- KubeRay ---------------------------------------------------------------------------------


def _strict(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"type": ["string", "integer"]}
_RESOURCES = _strict({key: {"type": "object", "additionalProperties": _QUANTITY} for key in ("requests", "limits")})
_CONTAINER = _strict(
    {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "resources": _RESOURCES,
        "ports": {
            "type": "array",
            "items": _strict({"containerPort": {"type": "integer"}, "name": {"type": "string"}}, ("containerPort",)),
        },
        "volumeMounts": {
            "type": "array",
            "items": _strict(
                {"name": {"type": "string"}, "mountPath": {"type": "string"}, "readOnly": {"type": "boolean"}},
                ("name", "mountPath"),
            ),
        },
        "env": {"type": "array"},
    },
    ("name", "image", "resources"),
)
_POD_TEMPLATE = _strict(
    {
        "metadata": {"type": "object"},
        "spec": _strict(
            {
                "serviceAccountName": {"type": "string"},
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                "tolerations": {"type": "array", "items": {"type": "object"}},
                "nodeSelector": _STRING_MAP,
            },
            ("containers",),
        ),
    },
    ("spec",),
)
_CLUSTER_SPEC = _strict(
    {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "authOptions": _strict({"mode": {"enum": ["token", "disabled"]}}, ("mode",)),
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": _strict(
            {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
            }
        ),
        # KubeRay passes rayStartParams to `ray start` as map[string]string: a number must be quoted
        "headGroupSpec": _strict({"rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE}, ("template",)),
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": _strict(
                {
                    "groupName": {"type": "string"},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "rayStartParams": _STRING_MAP,
                    "template": _POD_TEMPLATE,
                },
                ("groupName", "minReplicas", "maxReplicas", "template"),
            ),
        },
    },
    ("rayVersion", "headGroupSpec", "workerGroupSpecs"),
)
_METADATA = _strict({"name": {"type": "string"}, "namespace": {"type": "string"}}, ("name",))
KUBERAY_SCHEMAS = {
    "RayJob": _strict(
        {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayJob"},
            "metadata": _METADATA,
            "spec": _strict(
                {
                    "entrypoint": {"type": "string", "minLength": 1},
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                    "runtimeEnvYAML": {"type": "string"},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "rayClusterSpec": _CLUSTER_SPEC,
                },
                ("entrypoint", "rayClusterSpec"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    "RayCluster": _strict(
        {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayCluster"},
            "metadata": _METADATA,
            "spec": _CLUSTER_SPEC,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
}
"""The fields of KubeRay's ray.io/v1 CRDs that these files use, typed as the CRDs type them;
any other field (a typo such as ``shutdownAfterJobFinish``) is an error."""


def _pods(cluster_spec: dict) -> list[tuple[str, dict]]:
    head = ("head", cluster_spec["headGroupSpec"]["template"]["spec"])
    return [head] + [(group["groupName"], group["template"]["spec"]) for group in cluster_spec["workerGroupSpecs"]]


def _gpus(pod: dict, side: str = "limits") -> int:
    return sum(
        int(container.get("resources", {}).get(side, {}).get("nvidia.com/gpu", 0)) for container in pod["containers"]
    )


def cluster_spec_problems(spec: dict) -> list[str]:
    """What a RayCluster spec (standalone or a RayJob's) must have."""
    problems = []
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode is not token")
    head = spec["headGroupSpec"]
    if str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        problems.append("the head does not set num-cpus: '0'")
    pods = _pods(spec)
    if _gpus(pods[0][1]):
        problems.append("the head requests GPUs")
    gpu_groups = [group for group in spec["workerGroupSpecs"] if _gpus(group["template"]["spec"]) >= 1]
    if not gpu_groups:
        problems.append("no worker group has an nvidia.com/gpu limit")
    for group in gpu_groups:
        pod = group["template"]["spec"]
        if _gpus(pod, "requests") not in (0, _gpus(pod)):
            problems.append(f"group {group['groupName']}: GPU requests differ from limits")
        if "/dev/shm" not in [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]:
            problems.append(f"group {group['groupName']}: no memory-backed /dev/shm")
    for group in spec["workerGroupSpecs"]:
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"group {group['groupName']}: replicas outside [minReplicas, maxReplicas]")
    images = {container["image"] for _, pod in pods for container in pod["containers"]}
    if images != {IMAGE}:
        problems.append(f"the pods run {sorted(images)}, not {IMAGE}")
    (account,) = [doc["metadata"]["name"] for _, doc in _by_kind("ServiceAccount")]
    problems += [
        f"pod {name} does not use the ServiceAccount {account}"
        for name, pod in pods
        if pod.get("serviceAccountName") != account
    ]
    return problems


def kuberay_problems(doc: dict) -> list[str]:
    """Schema errors of a KubeRay object, as ``path: message`` lines."""
    validator = jsonschema.Draft202012Validator(KUBERAY_SCHEMAS[doc["kind"]])
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in validator.iter_errors(doc)
    ]


def test_rayjob():
    ((_, job),) = _by_kind("RayJob")
    assert kuberay_problems(job) == []
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert _runtime_env_problems(yaml.safe_load(spec["runtimeEnvYAML"])) == []
    args = parse_command(spec["entrypoint"])
    assert args.command == "run" and args.storage and "://" in args.storage, "storage must be shared object storage"
    mounts = [
        m["mountPath"]
        for c in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
        for m in c.get("volumeMounts", [])
    ]
    assert any(args.pipeline.startswith(mount.rstrip("/") + "/") for mount in mounts), (
        f"the head pod does not mount {args.pipeline}"
    )
    assert cluster_spec_problems(spec["rayClusterSpec"]) == []


def test_raycluster():
    ((_, cluster),) = _by_kind("RayCluster")
    assert kuberay_problems(cluster) == []
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert any(group["maxReplicas"] > group["minReplicas"] for group in spec["workerGroupSpecs"])
    assert cluster_spec_problems(spec) == []
    broken = yaml.safe_load(yaml.safe_dump(spec))
    broken["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
    broken["authOptions"]["mode"] = "disabled"
    broken["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.60.0-py311-gpu"
    assert len(cluster_spec_problems(broken)) == 3


def test_the_kuberay_schema_catches_wrong_fields():
    ((_, job),) = _by_kind("RayJob")
    broken = yaml.safe_load(yaml.safe_dump(job))
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    broken["spec"]["submissionMode"] = "K8sJob"
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    del broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
    problems = "\n".join(kuberay_problems(broken))
    for needle in ("shutdownAfterJobFinish", "spec.submissionMode", "rayStartParams.num-cpus", "'image' is a required"):
        assert needle in problems, problems


def test_serviceaccount_is_annotated_for_irsa():
    ((path, account),) = _by_kind("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert "iam.gke.io/gcp-service-account" in path.read_text()


# --- cluster launcher ------------------------------------------------------------------------


def _ray_schema() -> dict:
    (package,) = importlib.util.find_spec("ray").submodule_search_locations
    return json.loads((Path(package) / "autoscaler" / "ray-schema.json").read_text())


_WAITS_FOR_DRIVER = re.compile(r"until nvidia-smi\b|while ! nvidia-smi\b")


def launcher_problems(config: dict) -> list[str]:
    """What a cluster-launcher config must have, beyond Ray's own schema."""
    problems = []
    provider = config["provider"]["type"]
    if provider not in ("aws", "gcp"):
        return [f"provider.type {provider!r}"]
    types = config["available_node_types"]
    if config.get("head_node_type") not in types:
        return [f"head_node_type {config.get('head_node_type')!r} is not in available_node_types"]

    def gpu_count(node: dict) -> int:
        if provider == "aws":
            return int(node["node_config"].get("InstanceType", "").split(".")[0] in AWS_GPU_FAMILIES)
        return sum(a.get("acceleratorCount", 0) for a in node["node_config"].get("guestAccelerators", []))

    gpu_types = {name: node for name, node in types.items() if gpu_count(node)}
    if not gpu_types:
        problems.append("no GPU worker type")
    if config["head_node_type"] in gpu_types:
        problems.append("the head is a GPU type")
    identity = "IamInstanceProfile" if provider == "aws" else "serviceAccounts"
    problems += [f"{name}: no {identity}" for name, node in gpu_types.items() if identity not in node["node_config"]]
    if provider == "gcp":
        for name, node in gpu_types.items():
            if {"onHostMaintenance": "TERMINATE"} not in node["node_config"].get("scheduling", []):
                problems.append(f"{name}: GPU VMs need onHostMaintenance TERMINATE")
            # Ray detects a node type's resources only on AWS and Kubernetes: on GCP they are declared
            resources = node.get("resources", {})
            if resources.get("GPU") != gpu_count(node) or not resources.get("CPU", 0) >= 1:
                problems.append(f"{name}: resources {resources} do not declare its CPUs and {gpu_count(node)} GPU(s)")
            if not any(_WAITS_FOR_DRIVER.search(command) for command in node.get("initialization_commands", [])):
                problems.append(f"{name}: no initialization command waits for the NVIDIA driver (nvidia-smi)")
    docker = config.get("docker", {})
    if docker.get("image") != IMAGE:
        problems.append(f"docker.image is {docker.get('image')!r}, not {IMAGE}")
    commands = [
        command
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands")
        for command in config.get(key, [])
    ]
    problems += install_problems("\n".join(commands))
    starts = config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", [])
    problems += [
        f"{command!r} starts Ray without RAY_AUTH_MODE=token"
        for command in starts
        if "ray start" in command and "RAY_AUTH_MODE=token" not in command
    ]
    return problems


@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_launcher(provider):
    configs = [doc for path, doc in _launchers() if doc["provider"]["type"] == provider]
    assert len(configs) == 1, f"{len(configs)} {provider} launcher configs"
    (config,) = configs
    jsonschema.validate(config, _ray_schema())
    assert config["cluster_name"]
    assert launcher_problems(config) == []
    if provider == "gcp":
        assert (
            config["provider"]["region"]
            and config["provider"]["availability_zone"]
            and config["provider"]["project_id"]
        )
    broken = yaml.safe_load(yaml.safe_dump(config))
    for node in broken["available_node_types"].values():
        node["node_config"].pop("guestAccelerators", None)
        if "InstanceType" in node["node_config"]:
            node["node_config"]["InstanceType"] = "m5.large"
    assert "no GPU worker type" in launcher_problems(broken)


def test_the_launcher_checks_find_the_gcp_mistakes():
    (config,) = [doc for _, doc in _launchers() if doc["provider"]["type"] == "gcp"]
    broken = yaml.safe_load(yaml.safe_dump(config))
    gpu_types = [
        name for name, node in broken["available_node_types"].items() if "guestAccelerators" in node["node_config"]
    ]
    for name in gpu_types:
        broken["available_node_types"][name]["resources"] = {}
        broken["available_node_types"][name].pop("initialization_commands")
    broken["docker"]["image"] = "rayproject/ray:2.60.0-py311-gpu"
    broken["setup_commands"] = ['pip install -U "ray[default]==2.60.0" "rectiflow==0.1.0" gcsfs']
    jsonschema.validate(broken, _ray_schema())  # Ray's schema takes all of it
    problems = launcher_problems(broken)
    for name in gpu_types:
        assert [line for line in problems if line.startswith(f"{name}: resources {{}}")], problems
        assert [line for line in problems if line.startswith(f"{name}:") and "nvidia-smi" in line], problems
    assert [line for line in problems if line.startswith("docker.image")], problems
    assert [line for line in problems if "rectiflow==0.1.0" in line], problems


def test_every_file_with_commands_has_them():
    found = {}
    for name, command in _file_commands():
        found.setdefault(name, set()).add(next(w for w in shlex.split(command)[1:] if not w.startswith("-")))
    assert found.get("kuberay/rayjob.yaml") == {"run"}
    assert "submit" in found.get("kuberay/raycluster.yaml", set())
    assert "submit" in found.get("launcher/aws.yaml", set()) and "submit" in found.get("launcher/gcp.yaml", set())
    assert found.get("runtime_env.yaml") == {"run", "submit"}
    assert {"run", "submit", "logs", "stop", "status", "report"} <= found.get("README.md", set())


@pytest.mark.parametrize("name,command", _command_params())
def test_every_command_parses_with_the_cli(name, command):
    args = parse_command(command)
    assert key_problems([item.split("=", 1)[0] for item in getattr(args, "overrides", [])]) == []


def test_a_wrong_flag_or_subcommand_is_caught():
    text = (
        "```bash\nRAY_AUTH_MODE=token rectiflow submit p.yaml --adress http://h:8265\n"
        "ray job submit -- rectiflow runn p.yaml\n```\n"
    )
    commands = commands_in(text, markdown=True)
    assert commands == ["rectiflow submit p.yaml --adress http://h:8265", "rectiflow runn p.yaml"]
    for command in commands:
        with pytest.raises(AssertionError, match="the CLI rejects"):
            parse_command(command)
    assert len(inline_problems("use `rectiflow run --nowait` or `rectiflow sumbit`")) == 2
    with pytest.raises(AssertionError, match="--storag is not an option"):
        parse_command("rectiflow run p.yaml --storag s3://b/p")  # argparse alone takes the prefix


def test_inline_commands_in_the_guide_use_real_options():
    assert inline_problems(GUIDE.read_text()) == []


def test_pipeline_keys_in_the_guide_exist():
    keys = re.findall(r"`((?:train|couple|evaluate)\.[a-z_]+)", GUIDE.read_text())
    assert {"train", "couple", "evaluate"} <= {k for k, v in pipeline_schema().items() if v}
    assert {"train.workers", "train.gpus_per_worker", "couple.workers", "couple.gpus_per_worker"} <= set(keys)
    assert key_problems(keys) == []
    assert key_problems(["train.gpu_per_worker", "coupling.workers"]) != []
    assert len(key_problems(["train.gpu_per_worker", "coupling.workers"])) == 2


def test_the_guide_says_how_to_pass_the_token():
    text = GUIDE.read_text()
    for needle in (
        "RAY_AUTH_MODE=token",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "~/.ray/auth_token",
        "AWS_ENDPOINT_URL",
        "IRSA",
        "backoffLimit",
        "FailureConfig",
        "_SUCCESS.json",
    ):
        assert needle in text, needle
    assert not any("RAY_AUTH_MODE=disabled" in path.read_text() and path != GUIDE for path in TEXT_FILES)


@pytest.mark.parametrize("path", TEXT_FILES, ids=_ids(TEXT_FILES))
def test_no_credentials(path):
    documents = _all_documents(path) if path.suffix == ".yaml" else []
    assert credential_problems(path.read_text(), documents) == []


def test_the_credential_check_finds_planted_ones():
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert credential_problems(f"id: {key_id}")
    assert credential_problems("aws_secret_access_key = x")
    assert credential_problems("export RAY_AUTH_TOKEN=" + "abc123")
    assert credential_problems("RAY_AUTH_TOKEN: 'abc123'")
    assert not credential_problems('export RAY_AUTH_TOKEN="$(kubectl get secret x)"')
    assert not credential_problems("RAY_AUTH_TOKEN_PATH=/run/token and `RAY_AUTH_TOKEN`, else")
    assert credential_problems("", [{"env": [{"name": "RAY_AUTH_TOKEN", "value": "abc"}]}])
    assert credential_problems("", [{"env_vars": {"MINIO_SECRET_KEY": "abc"}}])
    assert not credential_problems("", [{"env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {}}}]}])
    assert not credential_problems("", [{"file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"}}])
