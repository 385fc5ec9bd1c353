"""The deployment text under ``cluster/``: every YAML parses and has what its kind needs, every
``rectiflow`` command in it (and in the guide's code) is accepted by the real CLI, every pipeline
key it names exists, and nothing in it looks like a credential."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

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
    "kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "kuberay/serviceaccount.yaml",
    "launcher/aws.yaml", "launcher/gcp.yaml", "runtime_env.yaml",
}
AWS_GPU_FAMILIES = {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5", "p5e"}


def _ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(CLUSTER)) for path in paths]


def _documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _by_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path in YAML_FILES for doc in _documents(path)
            if isinstance(doc, dict) and doc.get("kind") == kind]


def _launchers() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in YAML_FILES for doc in _documents(path)
            if isinstance(doc, dict) and "provider" in doc]


# --- finding commands -------------------------------------------------------------------------

# A command starts a (comment-stripped) line, follows `--` (ray job submit … -- rectiflow …),
# `&&`, `;` or `entrypoint:`, possibly after VAR=value prefixes; it ends at # ; & | or a backtick.
_COMMAND = re.compile(
    r"(?:^|\s--\s|&&|;|\bentrypoint:)\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(rectiflow\s[^#;&|`]*)"
)
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
            found += [match.group(1).strip() for match in _COMMAND.finditer(line)]
    return found


def _file_commands() -> list[tuple[str, str]]:
    return [(str(path.relative_to(CLUSTER)), command) for path in TEXT_FILES
            for command in commands_in(path.read_text(), path.suffix == ".md")]


def _command_params() -> list:
    return [pytest.param(name, command, id=f"{name}:{index}")
            for index, (name, command) in enumerate(_file_commands())]


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
    return [f"{' '.join(words)!r}: {word} is not an option of {rest[0]}"
            for word in rest[1:] if word.startswith("-") and word.split("=")[0] not in options]


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
    return [problem for match in _INLINE.finditer(_FENCE.sub("", text))
            for problem in option_problems(match.group(1).split())]


# --- pipeline keys (read from the source, without importing torch) --------------------------


def _classes() -> dict[str, ast.ClassDef]:
    classes = {}
    for path in (ROOT / "workflows").rglob("*.py"):
        classes.update({node.name: node for node in ast.walk(ast.parse(path.read_text()))
                        if isinstance(node, ast.ClassDef)})
    return classes


def _class_fields(name: str, classes: dict[str, ast.ClassDef]) -> set[str]:
    """The annotated fields of class ``name`` and of its bases defined in workflows/."""
    node = classes[name]
    fields = {item.target.id for item in node.body
              if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
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
        problems += [f"{key} has a literal value" for key, value in mapping.items()
                     if _secret_name(key) and isinstance(value, (str, int))]
    return problems


def _all_documents(path: Path) -> list[Any]:
    """A file's documents, plus the runtime envs embedded as YAML strings."""
    documents = _documents(path)
    return documents + [yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) for doc in documents
                        if isinstance(doc, dict) and doc.get("kind") == "RayJob"]


# --- tests -----------------------------------------------------------------------------------


def test_the_deployment_files_exist():
    assert EXPECTED <= set(_ids(YAML_FILES)), EXPECTED - set(_ids(YAML_FILES))
    assert GUIDE.is_file() and len(GUIDE.read_text().splitlines()) <= 130


@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_every_yaml_parses_and_every_document_has_a_known_kind(path):
    documents = _documents(path)
    assert documents, f"{path} is empty"
    for doc in documents:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        known = doc.get("kind") in ("RayJob", "RayCluster", "ServiceAccount") or "provider" in doc
        assert known or path.name == "runtime_env.yaml", f"{path}: unrecognised document {sorted(doc)}"


def _runtime_env_problems(env: Any) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    if not isinstance(env, dict):
        return [f"the runtime env is a {type(env).__name__}, not a mapping"]
    unknown = set(env) - set(RuntimeEnv.known_fields)
    if unknown:
        return [f"unknown runtime env keys {sorted(unknown)}"]
    RuntimeEnv(**env)  # type checks (env_vars values must be strings, …)
    packages = env.get("pip", [])
    packages = packages.get("packages", []) if isinstance(packages, dict) else packages
    return [] if any(str(p).startswith("rectiflow") for p in packages) else ["pip does not install rectiflow"]


def test_runtime_env_file_is_a_runtime_env():
    (doc,) = _documents(CLUSTER / "runtime_env.yaml")
    assert _runtime_env_problems(doc) == []
    assert _runtime_env_problems({**doc, "pipp": ["x"]}), "an unknown key must be reported"


def _pods(cluster_spec: dict) -> list[tuple[str, dict]]:
    head = ("head", cluster_spec["headGroupSpec"]["template"]["spec"])
    return [head] + [(group["groupName"], group["template"]["spec"]) for group in cluster_spec["workerGroupSpecs"]]


def _gpus(pod: dict) -> int:
    return sum(int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for container in pod["containers"])


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
    for group in spec["workerGroupSpecs"]:
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"group {group['groupName']}: replicas outside [minReplicas, maxReplicas]")
    (account,) = [doc["metadata"]["name"] for _, doc in _by_kind("ServiceAccount")]
    problems += [f"pod {name} does not use the ServiceAccount {account}"
                 for name, pod in pods if pod.get("serviceAccountName") != account]
    return problems


def test_rayjob():
    ((path, job),) = _by_kind("RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert _runtime_env_problems(yaml.safe_load(spec["runtimeEnvYAML"])) == []
    args = parse_command(spec["entrypoint"])
    assert args.command == "run" and args.storage and "://" in args.storage, "storage must be shared object storage"
    mounts = [m["mountPath"] for c in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
              for m in c.get("volumeMounts", [])]
    assert any(args.pipeline.startswith(mount.rstrip("/") + "/") for mount in mounts), \
        f"the head pod does not mount {args.pipeline}"
    assert cluster_spec_problems(spec["rayClusterSpec"]) == []


def test_raycluster():
    ((path, cluster),) = _by_kind("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert any(group["maxReplicas"] > group["minReplicas"] for group in spec["workerGroupSpecs"])
    assert cluster_spec_problems(spec) == []
    broken = yaml.safe_load(yaml.safe_dump(spec))
    broken["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
    broken["authOptions"]["mode"] = "disabled"
    assert len(cluster_spec_problems(broken)) == 2


def test_serviceaccount_is_annotated_for_irsa():
    ((path, account),) = _by_kind("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert "iam.gke.io/gcp-service-account" in path.read_text()


def _ray_schema() -> dict:
    (package,) = importlib.util.find_spec("ray").submodule_search_locations
    return json.loads((Path(package) / "autoscaler" / "ray-schema.json").read_text())


def launcher_problems(config: dict) -> list[str]:
    """What a cluster-launcher config must have, beyond Ray's own schema."""
    problems = []
    provider = config["provider"]["type"]
    if provider not in ("aws", "gcp"):
        return [f"provider.type {provider!r}"]
    types = config["available_node_types"]
    if config.get("head_node_type") not in types:
        return [f"head_node_type {config.get('head_node_type')!r} is not in available_node_types"]

    def is_gpu(node: dict) -> bool:
        if provider == "aws":
            return node["node_config"].get("InstanceType", "").split(".")[0] in AWS_GPU_FAMILIES
        return any(a.get("acceleratorCount", 0) >= 1 for a in node["node_config"].get("guestAccelerators", []))

    gpu_types = {name: node for name, node in types.items() if is_gpu(node)}
    if not gpu_types:
        problems.append("no GPU worker type")
    if config["head_node_type"] in gpu_types:
        problems.append("the head is a GPU type")
    identity = "IamInstanceProfile" if provider == "aws" else "serviceAccounts"
    problems += [f"{name}: no {identity}" for name, node in gpu_types.items() if identity not in node["node_config"]]
    if provider == "gcp":
        problems += [f"{name}: GPU VMs need onHostMaintenance TERMINATE" for name, node in gpu_types.items()
                     if {"onHostMaintenance": "TERMINATE"} not in node["node_config"].get("scheduling", [])]
    if not any("rectiflow" in command for command in config.get("setup_commands", [])):
        problems.append("setup_commands do not install rectiflow")
    starts = config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", [])
    problems += [f"{command!r} starts Ray without RAY_AUTH_MODE=token" for command in starts
                 if "ray start" in command and "RAY_AUTH_MODE=token" not in command]
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
        assert config["provider"]["region"] and config["provider"]["availability_zone"] and config["provider"]["project_id"]
    broken = yaml.safe_load(yaml.safe_dump(config))
    for node in broken["available_node_types"].values():
        node["node_config"].pop("guestAccelerators", None)
        if "InstanceType" in node["node_config"]:
            node["node_config"]["InstanceType"] = "m5.large"
    assert "no GPU worker type" in launcher_problems(broken)


def test_every_file_with_commands_has_them():
    found = {}
    for name, command in _file_commands():
        found.setdefault(name, set()).add(next(w for w in shlex.split(command)[1:] if not w.startswith("-")))
    assert found.get("kuberay/rayjob.yaml") == {"run"}
    assert "submit" in found.get("kuberay/raycluster.yaml", set())
    assert "submit" in found.get("launcher/aws.yaml", set()) and "submit" in found.get("launcher/gcp.yaml", set())
    assert found.get("runtime_env.yaml") == {"run"}
    assert {"run", "submit", "logs", "status", "report"} <= found.get("README.md", set())


@pytest.mark.parametrize("name,command", _command_params())
def test_every_command_parses_with_the_cli(name, command):
    args = parse_command(command)
    assert key_problems([item.split("=", 1)[0] for item in getattr(args, "overrides", [])]) == []


def test_a_wrong_flag_or_subcommand_is_caught():
    text = "```bash\nRAY_AUTH_MODE=token rectiflow submit p.yaml --adress http://h:8265\n" \
           "ray job submit -- rectiflow runn p.yaml\n```\n"
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
    for needle in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token",
                   "AWS_ENDPOINT_URL", "IRSA", "backoffLimit", "FailureConfig", "_SUCCESS.json"):
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
