"""Pretrained backbone weights: offline by default, strict, and named.

The releases start every backbone from ImageNet weights (LFDL.md, MITL.md): both LFDL streams from ImageNet Xception,
MITL's local encoder from ImageNet ConvNeXt-T and its global encoder from MiT-B3. A config names them in three
keys, each ``scratch`` (or null: train from random initialisation, said explicitly) or one of:

- a local file: ``.pth`` / ``.pt`` / ``.bin`` (a torch state dict, possibly wrapped in ``state_dict`` / ``model``,
  ``module.`` prefixes allowed) or ``.safetensors``;
- a folder written by ``save_pretrained`` (transformers) or by timm / ``morphfuse weights download``: its
  ``model.safetensors`` or ``pytorch_model.bin`` (or its single weights file) is read; a transformers folder of a
  SegFormer / MiT is loaded with ``SegformerModel.from_pretrained``;
- a hub id, resolved from the LOCAL caches only, never from the network: a timm name (``legacy_xception.tf_in1k``,
  ``convnext_tiny.in12k_ft_in1k``) is looked up where timm would have cached it (the Hugging Face cache for weights
  timm keeps on the Hub, the torch hub folder ``$TORCH_HOME/hub/checkpoints`` for URL weights); an ``org/name``
  (``nvidia/mit-b3``, ``timm/convnext_tiny.fb_in1k``, optionally ``@revision``) is a Hugging Face repository
  looked up in the local Hugging Face cache (``huggingface_hub`` with ``local_files_only``).

``morphfuse weights download --to DIR`` is the one command that uses the network (opt-in, never run by tests): it
fetches the paper's three weights into DIR, writes their SHA-256 to ``DIR/SHA256SUMS`` and a config overlay
``DIR/pretrained.yaml`` naming them. ``morphfuse weights list`` prints the table of weights, ``morphfuse weights
check --config ...`` the planning check (:func:`missing_weights`) that the workflow runs before any job.

Loading is strict (the loaders live with the networks: ``lfdl.LFDL.load_backbone_weights``,
``mitl.load_convnext_checkpoint``, ``mitl.load_segformer_checkpoint``): a file that does not fill every backbone
tensor, or holds tensors the backbone does not have (beyond the classifier heads and the modules the network
deliberately drops), is an error listing the missing and unexpected keys.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError

log = logging.getLogger(__name__)

SCRATCH = "scratch"
STATE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")  # read in this order from a save_pretrained folder
HF_REPO = re.compile(r"^(?:hf[-_]hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")
TIMM_NAME = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)?$")


@dataclass(frozen=True)
class Weight:
    """One weight the releases use."""

    key: str          # xception | convnext | segformer
    option: str       # the config key that names it
    what: str
    used_by: str
    hub_id: str       # what configs/paper.yaml puts in the option (resolved from the local cache)
    file: str         # the file fetched by `morphfuse weights download`
    source: str       # where `morphfuse weights download` fetches it
    release_file: str  # what the authors' code loads
    sha256: str       # of `file`; "" where no published value was found (the download records what it got)
    note: str = ""


WEIGHTS: dict[str, Weight] = {
    "xception": Weight(
        "xception", "lfdl.pretrained", "ImageNet Xception (Cadene's port of the Keras weights)",
        "LFDL, both streams (RGB and SRM)", "legacy_xception.tf_in1k", "xception-43020ad28.pth",
        "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-cadene/xception-43020ad28.pth",
        "xception-b5690688.pth (Cadene, 2-D pointwise weights; both layouts load)", "",
        "the file name carries the SHA-256 prefix 43020ad28 by the torch-hub naming convention (not verified here)"),
    "convnext": Weight(
        "convnext", "mitl.pretrained.convnext", "ImageNet ConvNeXt-T (ImageNet-12k pretrained, ImageNet-1k fine-tuned)",
        "MITL local encoder (6-channel stem: RGB weights in channels 0-2)", "convnext_tiny.in12k_ft_in1k",
        "model.safetensors", "https://huggingface.co/timm/convnext_tiny.in12k_ft_in1k",
        "timm.create_model('convnext_tiny', pretrained=True) with timm 0.9.16 (its default tag)", "",
        "convnext_tiny.fb_in1k (Facebook's ImageNet-1k weights) loads too"),
    "segformer": Weight(
        "segformer", "mitl.pretrained.segformer", "MiT-B3 (SegFormer encoder, ImageNet-1k)",
        "MITL global encoder (6-channel stem: RGB weights in channels 0-2)", "nvidia/mit-b3",
        "model.safetensors + config.json", "https://huggingface.co/nvidia/mit-b3",
        "mit_b3.pth from NVlabs/SegFormer (original MiT key layout: converted on load)", ""),
}
OPTIONS = {w.option: w for w in WEIGHTS.values()}


# ------------------------------------------------------------------------------------------------ resolving
def is_scratch(spec: Any) -> bool:
    return spec is None or (isinstance(spec, str) and spec.strip().lower() == SCRATCH)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def torch_hub_checkpoints() -> Path:
    """Where timm and torch.hub keep URL weights: ``torch.hub.get_dir()/checkpoints`` (TORCH_HOME aware)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing(option: str, spec: str, reason: str) -> UserError:
    """The one-line error for a weight that is not found offline: what it is, why, and how to get it."""
    w = OPTIONS.get(option)
    what = f" ({w.what})" if w else ""
    return UserError(f"{option} = {spec!r}{what}: {reason}; get it with `morphfuse weights download --to weights` "
                     f"and add --configfile weights/pretrained.yaml, or give a local file or folder, or set "
                     f"{option}: {SCRATCH} to train from scratch")


def _hf_snapshot(repo: str, revision: str | None, option: str, spec: str) -> Path:
    from huggingface_hub import snapshot_download

    cache = hf_cache_dir()
    try:
        path = Path(snapshot_download(repo, revision=revision, cache_dir=str(cache), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not in the cache
        raise _missing(option, spec, f"Hugging Face repository {repo} is not in the local cache {cache} "
                                     f"({type(e).__name__})") from None
    return path


def _resolve_timm(name: str, option: str, spec: str) -> Path:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise _missing(option, spec, "neither a file or folder nor a known hub id (a timm model name such as "
                                     "legacy_xception.tf_in1k, or a Hugging Face org/name)")
    if cfg.hf_hub_id:
        repo, _, rev = cfg.hf_hub_id.partition("@")
        return _hf_snapshot(repo, rev or None, option, spec)
    if cfg.url:
        path = torch_hub_checkpoints() / os.path.basename(cfg.url.split("?")[0])
        if path.is_file():
            return path
        raise _missing(option, spec, f"not in the local torch hub cache ({path}; timm fetches it from {cfg.url})")
    raise _missing(option, spec, "timm has no weights for this name")


def resolve(spec: Any, option: str) -> Path | None:
    """The local file or folder that ``spec`` names, or None for ``scratch`` / null. Never uses the network.

    ``option`` is the config key (for messages). A path is taken relative to the working directory (the
    repository root under Snakemake). Raises a one-line :class:`UserError` when nothing is found.
    """
    if is_scratch(spec):
        return None
    if not isinstance(spec, (str, os.PathLike)):
        raise UserError(f"{option} = {spec!r}: must be {SCRATCH}, a local file or folder, or a hub id")
    from ..config import resolve_path

    text = os.fspath(spec).strip()
    path = resolve_path(text)
    if path.exists():
        return path
    m = HF_REPO.match(text)
    looks_like_path = (text.startswith((".", "/", "~")) or text.lower().endswith(STATE_SUFFIXES)
                       or text.count("/") > 1 or os.sep != "/" and os.sep in text)
    if m and not looks_like_path:
        return _hf_snapshot(m.group(1), m.group(2), option, text)
    if TIMM_NAME.match(text) and not looks_like_path:
        return _resolve_timm(text, option, text)
    raise _missing(option, text, f"no such file or folder ({path})")


def weights_file(path: Path, option: str) -> Path:
    """The weights file of ``path``: itself if a file, else the folder's model.safetensors / pytorch_model.bin,
    else its only state-dict file."""
    if path.is_file():
        return path
    for name in FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in STATE_SUFFIXES)
    if len(found) == 1:
        return found[0]
    what = "no weights file" if not found else f"{len(found)} weights files ({', '.join(p.name for p in found)})"
    raise UserError(f"{option} = {path}: folder has {what}; expected {' or '.join(FOLDER_FILES)}")


def read_state_dict(path: str | os.PathLike, option: str) -> dict:
    """Tensors of a weights file (or folder): safetensors or torch (``weights_only``); a ``state_dict`` / ``model``
    / ``state`` wrapper is unwrapped and ``module.`` prefixes are removed."""
    import torch

    p = weights_file(Path(path), option)
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{option} = {p}: not a readable weights file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    for key in ("state_dict", "model", "state"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise UserError(f"{option} = {p}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}


def strict_report(option: str, path, what: str, missing: Iterable[str], unexpected: Iterable[str]) -> None:
    """Raise a UserError listing the keys when ``missing`` or ``unexpected`` is not empty."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    if not missing and not unexpected:
        return

    def some(keys):
        return ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")

    raise UserError(f"{option} = {path}: does not fit {what}: {len(missing)} tensor(s) missing"
                    f"{' [' + some(missing) + ']' if missing else ''}, {len(unexpected)} unexpected"
                    f"{' [' + some(unexpected) + ']' if unexpected else ''}; give the matching checkpoint or "
                    f"{option}: {SCRATCH}")




# ---------------------------------------------------------------------------------------- planning check
def configured_weights(cfg: dict) -> list[tuple[str, Any]]:
    """``(config key, spec)`` of the three weights a config names (scratch / null included)."""
    lfdl = cfg.get("lfdl") or {}
    mitl_pre = (cfg.get("mitl") or {}).get("pretrained")
    if is_scratch(mitl_pre) or not isinstance(mitl_pre, dict):
        mitl_pre = {"convnext": mitl_pre, "segformer": mitl_pre}
    return [("lfdl.pretrained", lfdl.get("pretrained")),
            ("mitl.pretrained.convnext", mitl_pre.get("convnext")),
            ("mitl.pretrained.segformer", mitl_pre.get("segformer"))]


def missing_weights(cfg: dict) -> list[str]:
    """One message per weight the config names that cannot be found offline (empty: all in place or scratch).

    The workflow calls this while planning (``snakemake -n`` included), so a paper run without its weights stops
    before any job, naming each missing weight and how to get it.
    """
    out = []
    for option, spec in configured_weights(cfg):
        try:
            resolve(spec, option)
        except UserError as e:
            out.append(str(e))
    return out


def weight_paths(cfg: dict, model: str | None = None) -> list[str]:
    """The local files / folders of the weights a config names (for rule inputs: a new file reruns training);
    ``model`` = lfdl | mitl restricts them to that model. Missing weights are left out (see missing_weights)."""
    out = []
    for option, spec in configured_weights(cfg):
        if model and not option.startswith(model + "."):
            continue
        try:
            p = resolve(spec, option)
        except UserError:
            continue
        if p is not None:
            out.append(str(p))
    return out


# --------------------------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="weights_command", metavar="list | check | download")
    sub.required = True
    sub.add_parser("list", help="the weights the releases use: id, file, source, SHA-256 (offline)")
    p = sub.add_parser("check", help="which weights of a config are missing offline (the planning check)")
    p.add_argument("--config", required=True, nargs="+", help="config.yaml and overlays, later ones win")
    p = sub.add_parser("download", help="fetch the paper's weights into a folder (the ONE networked command)")
    p.add_argument("--to", required=True, help="folder to write the weights, SHA256SUMS and pretrained.yaml into")
    p.add_argument("--only", nargs="+", choices=sorted(WEIGHTS), default=None, help="only these weights")


def _table() -> str:
    rows = ["| weight | config key | id (paper.yaml) | file | SHA-256 | the release loads |",
            "|---|---|---|---|---|---|"]
    for w in WEIGHTS.values():
        rows.append(
            f"| {w.what} | `{w.option}` | `{w.hub_id}` | {w.file} | "
            f"{w.sha256 or 'not found offline; `weights download` writes it to SHA256SUMS'}"
            f" | {w.release_file} |"
        )
    return "\n".join(rows)


def _download_one(w: Weight, dest: Path) -> list[Path]:
    """Fetch one weight into ``dest``; returns the files written."""
    if w.key == "xception":
        import torch

        out = dest / w.file
        if not out.is_file():
            torch.hub.download_url_to_file(w.source, str(out), progress=True)
        return [out]
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo = w.source.split("huggingface.co/", 1)[1]
    folder = dest / repo.split("/", 1)[1]
    files = [Path(hf_hub_download(repo, "config.json", local_dir=str(folder)))]
    try:
        files.append(Path(hf_hub_download(repo, "model.safetensors", local_dir=str(folder))))
    except EntryNotFoundError:
        files.append(Path(hf_hub_download(repo, "pytorch_model.bin", local_dir=str(folder))))
    return files


def _endpoint(w: Weight) -> str:
    return w.source if w.key == "xception" else os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _fail(w: Weight, e: BaseException) -> UserError:
    msg = str(e).splitlines()[0][:240] if str(e) else ""
    return UserError(f"weights download: cannot fetch {w.hub_id} from {_endpoint(w)} ({type(e).__name__}: {msg}); "
                     "this is the one command that needs the network")


def _probe(w: Weight) -> None:
    """One request to the weight's server (proxies from the environment), so that an offline machine gets one
    line at once instead of the hub client's retries; any HTTP answer counts as reachable."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(_endpoint(w), method="HEAD"), timeout=15.0).close()
    except urllib.error.HTTPError:
        return  # the server answered
    except Exception as e:  # noqa: BLE001 - DNS, refused, proxy, TLS: all one line
        raise _fail(w, e) from None


def download(dest: str | os.PathLike, only: list[str] | None = None) -> dict[str, Path]:
    """Download the chosen weights (default all three) into ``dest``. Network errors become one-line UserErrors."""
    import yaml

    from ..imageio import write_text_atomic

    dest = Path(dest).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    got: dict[str, Path] = {}
    sums: list[str] = []
    for key in only or list(WEIGHTS):
        w = WEIGHTS[key]
        _probe(w)
        try:
            files = _download_one(w, dest)
        except Exception as e:  # noqa: BLE001 - offline, proxy, DNS, HTTP errors: all one line for the user
            raise _fail(w, e) from None
        for f in files:
            from ..imageio import sha256_file

            sums.append(f"{sha256_file(f)}  {f.relative_to(dest)}")
        got[key] = files[0] if w.key == "xception" else files[0].parent
        log.info("%s -> %s", w.hub_id, got[key])
    write_text_atomic(dest / "SHA256SUMS", "\n".join(sums) + "\n")
    overlay: dict[str, Any] = {}
    if "xception" in got:
        overlay["lfdl"] = {"pretrained": str(got["xception"])}
    mitl = {k: str(got[k]) for k in ("convnext", "segformer") if k in got}
    if mitl:
        overlay["mitl"] = {"pretrained": mitl}
    write_text_atomic(dest / "pretrained.yaml", "# written by `morphfuse weights download`\n"
                      + yaml.safe_dump(overlay, sort_keys=True))
    return got


def run(args: argparse.Namespace) -> int:
    if args.weights_command == "list":
        print(_table())
        return 0
    if args.weights_command == "check":
        from ..config import deep_update, load_config

        cfg: dict = {}
        for path in args.config:
            cfg = deep_update(cfg, load_config(path) if not cfg else _read_yaml(path))
        missing = missing_weights(cfg)
        for m in missing:
            print(m)
        if not missing:
            print("every configured weight is in place (or scratch)")
        return 1 if missing else 0
    got = download(args.to, args.only)
    print(f"downloaded {', '.join(WEIGHTS[k].hub_id for k in got)} into {Path(args.to).resolve()}; SHA-256 in "
          f"SHA256SUMS; use them with --configfile {Path(args.to) / 'pretrained.yaml'}")
    return 0


def _read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file does not exist")
    return yaml.safe_load(p.read_text()) or {}
