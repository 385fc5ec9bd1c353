"""The layer rule of ARCHITECTURE.md: arrows only point down (cluster → workflows → rf). Paths are
resolved from the repository root, so the check reads the real tree wherever pytest runs from."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_rf_never_imports_ray_fsspec_pyarrow_or_workflows():
    files = sorted((ROOT / "rf").rglob("*.py"))
    assert len(files) > 20, f"only {len(files)} files under {ROOT / 'rf'}: the check would be vacuous"
    forbidden = {"ray", "fsspec", "pyarrow", "s3fs", "workflows", "rectiflow"}
    offenders = {str(path.relative_to(ROOT)): sorted(_imports(path) & forbidden) for path in files}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_cluster_holds_no_python():
    assert (ROOT / "cluster").is_dir()
    assert sorted(str(path.relative_to(ROOT)) for path in (ROOT / "cluster").rglob("*.py")) == []


def test_the_config_layer_imports_no_stage_or_runtime_module():
    """settings, config and plan describe a run; they never import the stages that run it."""
    for name in ("workflows/settings", "workflows/config.py", "workflows/plan.py", "workflows/manifest.py"):
        paths = [ROOT / name] if name.endswith(".py") else sorted((ROOT / name).glob("*.py"))
        assert paths
        for path in paths:
            imported = _imports(path)
            assert not imported & {"ray", "torch"}, f"{path} imports {imported & {'ray', 'torch'}}"
            source = path.read_text()
            assert "workflows.stages" not in source and "workflows.pipeline" not in source, path
