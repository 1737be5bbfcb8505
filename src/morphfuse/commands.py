"""The subcommands of ``morphfuse``: name, the module that implements it, one line of help. A table of strings only
(no import), read by the CLI (:mod:`morphfuse.cli`) and by the code hashes (:mod:`morphfuse.hashing`: each rule's
hash starts at its stage's module).
"""
from __future__ import annotations

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
    (
        "weights",
        "morphfuse.models.pretrained",
        "pretrained backbone weights: list them, check a config offline, download them (the one networked command)",
    ),
    ("train", "morphfuse.training.cli", "train LFDL or MITL (resumable; torchrun for several GPUs)"),
    ("predict", "morphfuse.predict", "per-image scores and full-size probability masks for one shard"),
    (
        "predictions-from-files",
        "morphfuse.stages.predictions_from_files",
        "take any method's masks and scores from files instead of the models",
    ),
    (
        "perturb",
        "morphfuse.stages.perturb",
        "perturb one shard's images (JPEG, downscale, blur, noise) for the robustness sweep",
    ),
    ("fuse", "morphfuse.stages.fuse", "fuse LFDL and MITL masks (MDMF and the ablation variants)"),
    ("evaluate", "morphfuse.evaluate", "detection and localization metrics of predictions against ground truth"),
    ("tables", "morphfuse.tables", "reduce per-shard evaluations to the ablation tables and figures"),
    (
        "robust-predict",
        "morphfuse.stages.robust_predict",
        "robustness sweep: perturb a shard, then faces, crops, features and both models on it (one job)",
    ),
    (
        "robust-evaluate",
        "morphfuse.stages.robust_evaluate",
        "robustness sweep: fuse and evaluate every variant of a perturbed shard's predictions (one job)",
    ),
    ("thresholds", "morphfuse.thresholds", "fit the image-score and mask thresholds on the val split"),
    ("robustness", "morphfuse.robustness", "the robustness table and plot: the ablation under every perturbation"),
    ("report", "morphfuse.report", "training curves, contact sheets, ledger counts and provenance for the report"),
    ("provenance", "morphfuse.provenance", "provenance.json of a run: config and hash, versions, git, machine, times"),
    ("export", "morphfuse.export", "bundle trained models, their config and a model card"),
    ("detect", "morphfuse.detect", "apply a model bundle to new images: scores, masks and overlays"),
    ("bulk", "morphfuse.stages.bulk", "shard a folder's image list for bulk detection, merge the shards' scores"),
]
