"""Parameter count, output shapes and forward GFLOPs of a model, printed as JSON.

By default the model is built and run on PyTorch's ``meta`` device: shapes and FLOPs without memory or compute, so
``morphfuse info lfdl --size 512`` takes a second. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``:
2 FLOPs per multiply-add of convolutions, matrix products and attention; element-wise work (BatchNorm, ReLU, tanh,
softmax) is not counted. Weights never change the counts, so ``pretrained`` options are ignored here.

A model module may define ``model_info(size, options=None, batch_size=1, device="meta") -> dict`` to replace the
generic measurement below; the generic one needs only the protocol of docs/CONTRACTS.md (``build_model`` and a
batch holding ``rgb``).
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from . import MODELS, build_model, model_module
from ..errors import UserError

log = logging.getLogger(__name__)
IGNORED_OPTIONS = ("pretrained", "pretrained_hub")  # weights do not change counts, and nothing is loaded here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=sorted(MODELS), help="which network")
    parser.add_argument("--size", type=int, default=None,
                        help="input side S (default: the config block's size, else the model's default)")
    parser.add_argument("--config", default=None, help="config.yaml whose model block gives the options")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a model option (VALUE read as YAML), repeatable; overrides the config")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the measured forward (default 1)")
    parser.add_argument("--device", default="meta",
                        help="meta (default: no memory, no compute), cpu or cuda (real tensors, same counts)")


def run(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    if args.config:
        from ..config import load_config

        options = dict(load_config(args.config).get(args.model) or {})
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. --option stem_padding=0")
        options[key.strip()] = yaml.safe_load(value)
    size = args.size or options.get("size")
    if args.batch < 1:
        raise UserError(f"--batch = {args.batch}: must be at least 1")
    print(json.dumps(model_info(args.model, size, options, batch_size=args.batch, device=args.device), indent=2))
    return 0


def model_info(name: str, size: int | None = None, options: dict[str, Any] | None = None,
               batch_size: int = 1, device: str = "meta") -> dict[str, Any]:
    """The model module's own ``model_info`` if it has one, else :func:`generic_model_info`."""
    module = model_module(name)
    if size is None:
        size = _default_size(module, name)
    own = getattr(module, "model_info", None)
    if callable(own):
        return own(size, options=options, batch_size=batch_size, device=device)
    return generic_model_info(name, size, options, batch_size=batch_size, device=device)


def generic_model_info(name: str, size: int, options: dict[str, Any] | None = None,
                       batch_size: int = 1, device: str = "meta") -> dict[str, Any]:
    """Build ``name`` on ``device``, run one forward of a (batch, 3, size, size) ``rgb`` batch in eval mode.

    When some operation of the model cannot run on the meta device, the measurement is repeated on the CPU (same
    counts, real compute) and the JSON says so (``meta_error``).
    """
    if torch.device(device).type != "meta":
        return _measure(name, size, options, batch_size, device)
    try:
        return _measure(name, size, options, batch_size, device)
    except (RuntimeError, NotImplementedError) as e:
        log.warning("morphfuse info %s: the meta device failed (%s); measuring on the CPU instead", name, e)
        info = _measure(name, size, options, batch_size, "cpu")
        info["meta_error"] = str(e).splitlines()[0][:300]
        return info


def _measure(name: str, size: int, options: dict[str, Any] | None, batch_size: int, device: str) -> dict[str, Any]:
    opts = {k: v for k, v in (options or {}).items() if k not in IGNORED_OPTIONS}
    dev = torch.device(device)
    with dev:
        model = build_model(name, size, opts).eval()
        rgb = torch.rand(batch_size, 3, size, size) if dev.type != "meta" else torch.empty(batch_size, 3, size, size)
    counter = FlopCounterMode(display=False, depth=64)
    with counter, torch.no_grad():
        out = model({"rgb": rgb})
    flops = counter.get_total_flops()
    by_module = _flops_by_child(counter, type(model).__name__, [n for n, _ in model.named_children()])
    by_module = {k: v for k, v in by_module.items() if v}
    if flops - sum(by_module.values()):
        by_module["(outside submodules)"] = flops - sum(by_module.values())
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    info = {
        "model": name,
        "size": size,
        "batch": batch_size,
        "device": str(dev),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "buffers": sum(b.numel() for b in model.buffers()),
        "parameters_by_module": {k: v for k, v in params.items() if v},
        "outputs": {k: list(v.shape) for k, v in out.items() if torch.is_tensor(v)},
        "forward_gflops": round(flops / batch_size / 1e9, 4),
        "forward_gflops_by_module": {k: round(v / batch_size / 1e9, 4) for k, v in by_module.items()},
        "flop_convention": "per image; 2 FLOPs per multiply-add (torch.utils.flop_counter); element-wise ops "
                           "not counted",
        "torch": torch.__version__,
    }
    geometry = getattr(model, "geometry", None)
    if isinstance(geometry, dict):
        info["geometry"] = geometry
    return info


def _flops_by_child(counter: FlopCounterMode, root: str, children: list[str]) -> dict[str, int]:
    """FLOPs per top-level child, also for children never called as a whole (their called submodules are summed)."""
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    out = {}
    for child in children:
        prefix = f"{root}.{child}"
        if prefix in counts:
            out[child] = counts[prefix]
            continue
        inside = [k for k in counts if k.startswith(prefix + ".")]
        outermost = [k for k in inside if not any(k.startswith(a + ".") for a in inside if a != k)]
        out[child] = sum(counts[k] for k in outermost)
    return out


def _default_size(module, name: str) -> int:
    import inspect

    cls = getattr(module, MODELS[name][1])
    default = inspect.signature(cls.__init__).parameters.get("size")
    if default is None or default.default is inspect.Parameter.empty:
        raise UserError(f"morphfuse info {name}: give --size (the model has no default input size)")
    return int(default.default)
