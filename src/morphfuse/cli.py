"""``morphfuse``: one subcommand per pipeline stage.

Each stage module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when their
subcommand runs, so ``morphfuse --help`` is fast and a missing optional dependency only affects its own stage.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import UserError

# (subcommand, module, one-line help). Modules are imported lazily.
COMMANDS: list[tuple[str, str, str]] = [
    ("config", "morphfuse.stages.effective_config", "validate a config; print or write it with every default filled"),
    ("index", "morphfuse.stages.index", "index the configured sources and split the real images by identity"),
    ("forge", "morphfuse.forge.cli", "make forgeries with exact masks from one shard of real images"),
    ("manifest", "morphfuse.stages.manifest", "merge the index and the forgeries into the sharded manifest"),
    ("faces", "morphfuse.faces.cli", "detect faces and landmarks in one shard"),
    ("crops", "morphfuse.faces.crops", "adaptive face crops (boxes in original coordinates) for one shard"),
    ("features", "morphfuse.features", "LFDL crops + SRM and MITL images + DCT bands for one shard"),
    ("info", "morphfuse.models.info", "parameter count, output shapes and GFLOPs of a model"),
    ("weights", "morphfuse.models.pretrained",
     "pretrained backbone weights: list them, check a config offline, download them (the one networked command)"),
    ("train", "morphfuse.training.cli", "train LFDL or MITL (resumable; torchrun for several GPUs)"),
    ("predict", "morphfuse.predict", "per-image scores and full-size probability masks for one shard"),
    ("predictions-from-files", "morphfuse.stages.predictions_from_files",
     "take any method's masks and scores from files instead of the models"),
    ("perturb", "morphfuse.stages.perturb", "perturb one shard's images (JPEG, downscale, blur, noise) for the robustness sweep"),
    ("fuse", "morphfuse.fusion", "fuse LFDL and MITL masks (MDMF and the ablation variants)"),
    ("evaluate", "morphfuse.evaluate", "detection and localization metrics of predictions against ground truth"),
    ("tables", "morphfuse.tables", "reduce per-shard evaluations to the ablation tables and figures"),
    ("robustness", "morphfuse.robustness", "the robustness table and plot: the ablation under every perturbation"),
    ("report", "morphfuse.report", "training curves, contact sheets, ledger counts and provenance for the report"),
    ("provenance", "morphfuse.provenance", "provenance.json of a run: config and hash, versions, git, machine, times"),
    ("export", "morphfuse.export", "bundle trained models, their config and a model card"),
    ("detect", "morphfuse.detect", "apply a model bundle to new images: scores, masks and overlays"),
    ("bulk", "morphfuse.stages.bulk", "shard a folder's image list for bulk detection, merge the shards' scores"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="morphfuse",
        description="Deepfake detection and localization: LFDL + MITL fused by morphology (MDMF). "
        "Each subcommand is one stage of the Snakemake workflow; run `morphfuse <stage> --help`.",
    )
    parser.add_argument("--version", action="version", version=f"morphfuse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    for name, module, help_text in COMMANDS:
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _record_modules(folder: str, argv: list[str]) -> None:
    """At exit, write the package modules this process loaded (the tests check the rules' code hashes cover
    them: ``MORPHFUSE_RECORD_MODULES=DIR``)."""
    import atexit
    import json
    import os

    def write() -> None:
        loaded = sorted(m for m in list(sys.modules) if m == "morphfuse" or m.startswith("morphfuse."))
        path = os.path.join(folder, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"argv": argv, "modules": loaded}, f)
        os.replace(path + ".tmp", path)

    os.makedirs(folder, exist_ok=True)
    atexit.register(write)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import os

    if os.environ.get("MORPHFUSE_RECORD_MODULES"):
        _record_modules(os.environ["MORPHFUSE_RECORD_MODULES"], argv)
    parser = build_parser()
    # Parse only the global part; the chosen stage parses the rest with its own parser.
    names = {c[0]: c for c in COMMANDS}
    idx = next((i for i, a in enumerate(argv) if a in names), None)
    if idx is None:
        args = parser.parse_args(argv)
        parser.print_help()
        return 0 if not argv else 2
    glob = parser.parse_args(argv[:idx]) if idx else argparse.Namespace(verbose=False)
    name, module, help_text = names[argv[idx]]
    logging.basicConfig(level=logging.DEBUG if glob.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mod = importlib.import_module(module)
    sp = argparse.ArgumentParser(prog=f"morphfuse {name}", description=(mod.__doc__ or help_text).strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(sp)
    args = sp.parse_args(argv[idx + 1:])
    try:
        return int(mod.run(args) or 0)
    except UserError as e:
        print(f"morphfuse {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
