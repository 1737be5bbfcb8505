"""The package's shape (docs/ARCHITECTURE.md): an import graph without cycles in which no module imports a higher
layer, one name per meaning, and a model registry instead of model-name branches in the engine, the training data
and prediction. The graph is the one the code hashes use (``hashing.direct_imports``: imports inside functions
included); an edge to a module's own parent package is Python's implicit import of a submodule's package."""
from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

import pytest

from morphfuse import hashing

PKG = Path(hashing.PACKAGE_ROOT)

# Lowest first: a module may import its own layer and the layers below, never one above.
LAYERS = {
    "foundations": ["errors", "textfmt", "attribution", "commands", "models.recipes", "metrics", "dct", "srm",
                    "normalize", "overlay", "perturb", "training.augment", "training.resources", "faces.landmarks",
                    "forge.common"],
    "io and config": ["imageio", "inputs", "config", "shards", "ledger", "outdir", "provenance", "hashing"],
    "domain": ["faces.backends", "models", "models.pretrained", "models.lfdl", "models.mitl", "models.info",
               "training.checkpoint", "fusion", "forge.sbi", "forge.random_combination", "forge.diffusion",
               "forge.importer", "forge.contact_sheet", "plots", "sources", "split", "bundle", "model_card"],
    "stages": ["faces.cli", "faces.crops", "features", "forge.cli", "training.data", "training.engine", "training.cli",
               "predict", "evaluate", "thresholds", "stages.fuse", "tables", "robustness", "export", "detect", "report",
               "stages.effective_config", "stages.index", "stages.manifest", "stages.perturb",
               "stages.predictions_from_files", "stages.bulk"],
    "entry points": ["cli", "__main__", "stages.chain", "stages.robust_predict", "stages.robust_evaluate"],
}
PACKAGES = {"morphfuse", "morphfuse.faces", "morphfuse.forge", "morphfuse.stages", "morphfuse.training"}


def _parents(module: str) -> set[str]:
    out = set()
    while "." in module:
        module = module.rpartition(".")[0]
        out.add(module)
    return out


def _graph() -> dict[str, set[str]]:
    modules = hashing._modules(str(PKG))
    return {m: set(hashing.direct_imports(m)) - _parents(m) for m in modules}


def test_every_module_has_a_layer():
    ranked = {f"morphfuse.{m}" for ms in LAYERS.values() for m in ms}
    assert set(_graph()) - PACKAGES == ranked, "add the new module to a layer here and in docs/ARCHITECTURE.md"


def test_the_import_graph_has_no_cycle():
    try:
        list(graphlib.TopologicalSorter(_graph()).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_no_module_imports_a_higher_layer():
    rank = {f"morphfuse.{m}": r for r, ms in enumerate(LAYERS.values()) for m in ms}
    names = list(LAYERS)
    up = [f"{m} ({names[rank[m]]}) -> {d} ({names[rank[d]]})" for m, deps in sorted(_graph().items()) if m in rank
          for d in sorted(deps) if d in rank and rank[d] > rank[m]]
    assert not up, "upward imports:\n" + "\n".join(up)


def test_a_top_level_name_means_one_thing():
    """No function or class name is defined at the top level of two modules (the stage protocol aside)."""
    protocol = {"add_arguments", "run"}
    where: dict[str, list[str]] = {}
    for p in sorted(PKG.rglob("*.py")):
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in protocol:
                where.setdefault(node.name, []).append(p.relative_to(PKG).as_posix())
    assert {k: v for k, v in where.items() if len(v) > 1} == {}


@pytest.mark.parametrize("module", ["training/engine.py", "training/data.py", "predict.py"])
def test_the_engine_data_and_prediction_hold_no_model_name_branch(module):
    text = (PKG / module).read_text()
    assert not re.findall(r"""[=!]=\s*["'](?:lfdl|mitl)["']|["'](?:lfdl|mitl)["']\s*[=!]=""", text)


def test_the_registry_is_complete_and_drives_the_recipe():
    import dataclasses

    import torch

    from morphfuse.config import defaults
    from morphfuse.models import MODELS, RECIPES, recipe
    from morphfuse.training import augment, engine

    assert set(MODELS) == set(RECIPES) == set(augment.RECIPES)
    s = dataclasses.replace(engine.Settings.from_config("lfdl", defaults()), lr=0.1, weight_decay=0.0, step_size=1,
                            gamma=0.5, warmup_epochs=1, min_lr=0.0)
    net = torch.nn.Linear(2, 1)
    for name, optimizer in (("lfdl", torch.optim.Adam), ("mitl", torch.optim.AdamW)):
        assert type(engine.build_optimizer(name, net, s, torch.device("cpu"))) is optimizer
    assert [engine.lr_factor_fn("lfdl", s, 2, 8)(k) for k in (0, 1, 2, 4)] == [1.0, 1.0, 0.5, 0.25]  # StepLR
    assert engine.lr_factor_fn("mitl", s, 2, 8)(0) == pytest.approx(0.5)  # warm-up: step 1 of 2
    assert recipe("lfdl").mixup and not recipe("mitl").mixup
    with pytest.raises(Exception, match="unknown"):
        recipe("resnet")


def test_functions_fit_in_a_reader_s_head():
    """No function of the package is longer than 80 lines (split along the paper's steps instead)."""
    long = []
    for p in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            n = node.end_lineno - node.lineno + 1 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else 0
            if n > 80:
                long.append(f"{p.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)
