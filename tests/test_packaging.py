"""morphfuse as a package (issue 13): every third-party import is a declared dependency (and what `morphfuse
detect` imports is a core one, so `pip install .` gives a working detector), the exact pins satisfy the declared
ranges, the conda env holds the same third-party ranges and no path, and the schema ships as package data."""
from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.resources
import re
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "morphfuse"


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared() -> tuple[set[str], set[str]]:
    proj = pyproject()["project"]
    core = {Requirement(r).name.lower().replace("_", "-") for r in proj["dependencies"]}
    extra = {Requirement(r).name.lower().replace("_", "-") for reqs in proj["optional-dependencies"].values()
             for r in reqs}
    nodeps = {Requirement(line).name.lower() for line in (REPO / "requirements-nodeps.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    return core, extra | nodeps


def imports(files) -> dict[str, set[str]]:
    """top-level module name -> files importing it (anywhere in the file), third-party only."""
    out: dict[str, set[str]] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top != "morphfuse" and top not in sys.stdlib_module_names:
                    out.setdefault(top, set()).add(f.name)
    return out


# Wheels whose top_level.txt names only their compiled module (packages_distributions misses the package).
COMPILED = {"dlib": {"dlib-bin"}}


def dists_of(module: str) -> set[str]:
    found = {d.lower().replace("_", "-") for d in md.packages_distributions().get(module, [])}
    return found | COMPILED.get(module, set())


def test_every_third_party_import_is_declared():
    core, extra = declared()
    missing = {m: sorted(fs) for m, fs in imports(SRC.rglob("*.py")).items() if not dists_of(m) & (core | extra)}
    assert not missing, f"imports without a declared distribution: {missing}"


def test_detect_needs_only_the_core_dependencies():
    from morphfuse.hashing import PACKAGE_ROOT, _modules, stage_closure

    files = [_modules(str(PACKAGE_ROOT))[m] for m in stage_closure("detect")]
    core, _ = declared()
    # modules a stage imports lazily for optional backends are allowed outside core
    optional = {"diffusers", "facenet_pytorch", "face_alignment", "tensorboard", "snakemake", "psutil"}
    missing = {m: sorted(fs) for m, fs in imports(files).items() if m not in optional and not dists_of(m) & core}
    assert not missing, f"`morphfuse detect` imports packages that `pip install .` does not bring: {missing}"


def test_exact_pins_satisfy_the_declared_ranges():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            pins[name.lower().replace("_", "-")] = Version(ver)
    proj = pyproject()["project"]
    reqs = [Requirement(r) for r in proj["dependencies"]] + [
        Requirement(r) for rs in proj["optional-dependencies"].values() for r in rs]
    for r in reqs:
        name = r.name.lower().replace("_", "-")
        assert name in pins, f"{name} has no exact pin in constraints.txt"
        assert r.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {r.specifier}"
    assert str(pins["torch"]) == "2.14.1" and str(pins["torchvision"]) == "0.29.1"


def test_the_conda_env_holds_pyprojects_third_party_ranges_and_no_path():
    env = yaml.safe_load((REPO / "envs" / "morphfuse.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert not [p for p in pip if p.startswith("-") or "/" in p or p.startswith(".")], pip
    proj = pyproject()["project"]
    want = proj["dependencies"] + proj["optional-dependencies"]["workflow"] + proj["optional-dependencies"]["diffusion"]
    norm = lambda rs: {str(Requirement(re.sub(r"\s*#.*", "", r))) for r in rs}  # noqa: E731
    assert norm(pip) == norm(want)


def test_the_schema_is_package_data():
    assert importlib.resources.files("morphfuse").joinpath("config.schema.yaml").is_file()
    data = pyproject()["tool"]["setuptools"]["package-data"]["morphfuse"]
    assert "*.yaml" in data
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


def test_the_package_version_is_pyprojects():
    import morphfuse

    assert morphfuse.__version__ == pyproject()["project"]["version"]
