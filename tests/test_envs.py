"""envs/*.yaml (for --software-deployment-method conda) must agree with pyproject.toml."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    for sep in "<>=!~ ;[":
        req = req.split(sep)[0]
    return req.strip().lower()


def _pyproject_deps() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_name(d): d.replace(" ", "") for d in deps}


def _env_pip_deps(path: Path) -> list[str]:
    env = yaml.safe_load(path.read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    return [d for d in pip if not d.startswith("-e")]


def test_every_env_pins_exactly_as_pyproject():
    deps = _pyproject_deps()
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert {p.stem for p in envs} >= {"data", "models", "extract", "analyze", "report"}
    for path in envs:
        for req in _env_pip_deps(path):
            assert _name(req) in deps, f"{path.name}: {req} is not a dependency in pyproject.toml"
            assert req.replace(" ", "") == deps[_name(req)], (
                f"{path.name}: {req} differs from pyproject.toml's {deps[_name(req)]}")


def test_envs_cover_every_runtime_dependency():
    covered = {_name(r) for p in (ROOT / "envs").glob("*.yaml") for r in _env_pip_deps(p)}
    missing = set(_pyproject_deps()) - covered - {"snakemake"}  # snakemake drives, it is not in a job
    assert not missing, f"pyproject dependencies in no envs/*.yaml: {sorted(missing)}"


def test_envs_install_the_project():
    for path in (ROOT / "envs").glob("*.yaml"):
        assert "-e .." in path.read_text(), f"{path.name} does not install the project"
