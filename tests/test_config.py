"""The one strict config schema (issue 9): defaults live in it only, every depth refuses unknown keys, types are
strict, and errors name the key, the value and what is allowed. The schema ships inside the package."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

import morphfuse
from morphfuse.cli import main
from morphfuse.config import (SCHEMA_PATH, StageConfig, config_json, default, defaults, load_stage_config,
                              validate_config)
from morphfuse.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def demo() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def problems(cfg) -> str:
    with pytest.raises(UserError) as ei:
        validate_config(cfg, "my.yaml")
    return str(ei.value)


@pytest.mark.parametrize("path", [("fusion", "kernal"), ("lfdl", "train", "lrr"), ("mitl", "score", "rul"),
                                  ("sources", 0, "identity", "patern"), ("forge", "sbi", "forehed"), ("typo",)])
def test_unknown_keys_at_any_depth_are_errors_naming_the_key(path):
    cfg = demo()
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = 1
    where = ".".join(str(p) for p in path)
    assert f"{where}: unknown key (allowed: " in problems(cfg)


@pytest.mark.parametrize("path,value,why", [
    (("lfdl", "train", "augment"), "no", "must be a boolean (true or false)"),
    (("lfdl", "train", "epochs"), 2.5, "must be an integer"),
    (("fusion", "kernel"), True, "must be an integer"),
    (("shard_size", ), "64", "must be an integer"),
    (("evaluate", "images"), "everything", "must be one of fake_only, all"),
    (("fusion", "threshold"), 1.5, "must be ≤ 1"),
    (("mitl", "size"), 100, "not a multiple of 32"),
])
def test_wrong_types_and_values_name_key_value_and_what_is_allowed(path, value, why):
    cfg = demo()
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    msg = problems(cfg)
    assert f"{'.'.join(path)} = {value!r}" in msg and why in msg, msg
    assert msg.startswith("my.yaml is invalid")


def test_every_default_is_filled_nested_blocks_included():
    cfg = {"sources": [{"name": "a", "kind": "folder", "root": "."}]}
    validate_config(cfg)
    assert cfg["fusion"] == {"variants": ["lfdl", "mitl", "naive_or", "mdmf", "closing_or"], "kernel": 5,
                             "threshold": 0.5}
    assert cfg["lfdl"]["train"]["mixup"] == 0.5 and cfg["mitl"]["score"] == {"rule": "top_percent", "percent": 1.0}
    assert cfg["sources"][0]["identity"] == {"rule": "file", "pattern": None, "fallback": "file"}
    assert cfg["forge"]["sd_inpaint"]["steps"] == 30
    # a partial block keeps its values and gets the rest
    part = {"sources": cfg["sources"], "lfdl": {"train": {"lr": 1e-3}}}
    validate_config(part)
    assert part["lfdl"]["train"]["lr"] == 1e-3 and part["lfdl"]["train"]["batch_size"] == 76
    assert part["lfdl"]["size"] == 299


def test_defaults_are_never_shared_between_configs():
    a, b = ({"sources": [{"name": "a", "kind": "folder", "root": "."}]} for _ in range(2))
    validate_config(a), validate_config(b)
    a["fusion"]["variants"].append("x")
    assert "x" not in b["fusion"]["variants"] and "x" not in defaults()["fusion"]["variants"]


def test_the_demo_config_and_the_paper_overlay_are_valid():
    cfg = validate_config(demo())
    assert cfg["lfdl"]["train"]["lr"] > 0 and cfg["evaluate"]["robustness"] is not None  # defaults filled
    from morphfuse.config import deep_update

    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    merged = validate_config(deep_update(demo(), paper))
    assert merged["lfdl"]["size"] == paper["lfdl"]["size"]  # the overlay's values survive validation


def test_the_schema_ships_inside_the_package_and_the_workflow_links_it():
    pkg = Path(morphfuse.__file__).resolve().parent
    assert SCHEMA_PATH.parent == pkg and SCHEMA_PATH.is_file()
    link = REPO / "workflow" / "schemas" / "config.schema.yaml"
    assert link.resolve() == SCHEMA_PATH.resolve()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"*.yaml"' in pyproject  # package data


def test_cli_defaults_come_from_the_schema():
    assert default("fusion.kernel") == 5 and default("mitl.score") == {"rule": "top_percent", "percent": 1.0}


def test_a_stage_sees_only_what_its_rule_declared():
    cfg = validate_config(demo())
    text = config_json(cfg, ["seed", "forge.sbi", "faces"])
    data = json.loads(text)
    assert set(data) == {"seed", "forge", "faces"} and set(data["forge"]) == {"sbi"}
    stage = load_stage_config(text)
    assert isinstance(stage, StageConfig) and stage["forge"]["sbi"]["forehead"] is True
    with pytest.raises(UserError, match=r"config key forge.per_real was not passed to this stage by its rule"):
        stage["forge"]["per_real"]
    with pytest.raises(UserError, match=r"config key fusion was not passed"):
        stage.get("fusion")
    assert config_json(copy.deepcopy(cfg), ["faces", "seed"]) == config_json(cfg, ["seed", "faces"])


def test_morphfuse_config_prints_the_effective_config(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"sources": [{"name": "a", "kind": "folder", "root": "."}], "fusion": {"kernel": 3}}))
    assert main(["config", "--config", str(p), "--out", str(tmp_path / "eff.yaml")]) == 0
    eff = yaml.safe_load((tmp_path / "eff.yaml").read_text())
    assert eff["fusion"]["kernel"] == 3 and eff["evaluate"]["bootstrap"] == 1000
    p.write_text(yaml.safe_dump({"sources": [{"name": "a", "kind": "folder", "root": "."}], "fusion": {"kernal": 3}}))
    assert main(["config", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "fusion.kernal: unknown key" in err and "Traceback" not in err
