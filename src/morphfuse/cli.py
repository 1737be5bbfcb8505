"""``morphfuse``: one subcommand per pipeline stage.

Each stage module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when their
subcommand runs, so ``morphfuse --help`` is fast and a missing optional dependency only affects its own stage.

Errors a user can cause never show a traceback: they are one line on stderr, ``morphfuse STAGE: error: ...``, and
a documented exit status (:mod:`morphfuse.errors`): 0 success, 1 some inputs could not be used (listed), 2 usage
error, 3 an output could not be written (no space, read-only, permission), 130/143 interrupted.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import re
import sys

from . import __version__
from .commands import COMMANDS
from .errors import EXIT_USAGE, EXIT_WRITE, Interrupted, OutputError, UserError, describe_oserror


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="morphfuse",
        description="Deepfake detection and localization: LFDL + MITL fused by morphology (MDMF). "
        "Each subcommand is one stage of the Snakemake workflow; run `morphfuse <stage> --help`.",
        epilog="Exit status: 0 success; 1 some inputs could not be used (each listed on stderr and in the ledger); "
        "2 usage error (bad option, config, bundle or path; one line on stderr); 3 an output could not be "
        "written (no space, read-only, permission; one line naming the path; what was finished is kept, rerun to "
        "resume); 130 / 143 interrupted by Ctrl-C / SIGTERM (what was finished is kept).",
    )
    parser.add_argument("--version", action="version", version=f"morphfuse {__version__}")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging (also accepted after the stage)")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (also after the stage)")
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


_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|ref|doc|py:\w+):`~?([^`]+)`")


def plain(text: str) -> str:
    """A docstring as --help text: Sphinx roles (:func:`a.b`) and double backticks become single-backtick code,
    the way a terminal reader writes it."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text or "")
    return re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S)


def _add_log_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging (also before the stage name)")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="warnings and errors only (also before the stage name)")


def stage_parser(name: str, mod=None) -> argparse.ArgumentParser:
    """The parser of one stage (what ``morphfuse NAME --help`` shows): the module's options, -v/-q, its
    docstring as the description."""
    entry = {c[0]: c for c in COMMANDS}[name]
    mod = mod or importlib.import_module(entry[1])
    sp = argparse.ArgumentParser(prog=f"morphfuse {name}", description=plain(mod.__doc__ or entry[2]).strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(sp)
    _finish(sp)
    return sp


def _finish(p: argparse.ArgumentParser) -> None:
    """-v/-q on ``p`` and on each of its sub-stages (``forge sbi``, ``bulk list``); help texts made plain."""
    _add_log_options(p)
    for a in p._actions:
        if a.help and a.help is not argparse.SUPPRESS:
            a.help = plain(a.help)
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                sub.description = plain(sub.description) if sub.description else sub.description
                _finish(sub)
            for ch in a._choices_actions:
                ch.help = plain(ch.help) if ch.help else ch.help


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
    glob = parser.parse_args(argv[:idx]) if idx else argparse.Namespace(verbose=False, quiet=False)
    name, module, help_text = names[argv[idx]]
    mod = importlib.import_module(module)
    args = stage_parser(name, mod).parse_args(argv[idx + 1:])
    verbose = bool(glob.verbose or getattr(args, "verbose", False))
    quiet = bool(glob.quiet or getattr(args, "quiet", False))
    if verbose and quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    for k in ("verbose", "quiet"):
        if hasattr(args, k):
            delattr(args, k)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _run_stage(name, mod, args)


def run_stage(name: str, mod, argv: list[str]) -> int:
    """``morphfuse <name> ARGV`` in this process, parsed by the stage's own parser; used by the commands that chain
    stages (``morphfuse robust-predict``), which import the stage modules themselves so that their code hash covers
    them. Logging is the calling command's."""
    args = stage_parser(name, mod).parse_args([str(a) for a in argv])
    for k in ("verbose", "quiet"):
        if hasattr(args, k):
            delattr(args, k)
    return _run_stage(name, mod, args)


def _input_errors() -> tuple:
    """Exception types that libraries raise for malformed input files."""
    out: list = []
    try:
        import yaml

        out.append(yaml.YAMLError)
    except ImportError:
        pass
    try:
        import pandas.errors as pe

        out += [pe.EmptyDataError, pe.ParserError]
    except ImportError:
        pass
    try:
        import pyarrow

        out.append(pyarrow.ArrowInvalid)
    except ImportError:
        pass
    return tuple(out)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _run_stage(name: str, mod, args) -> int:
    """Run a stage; user errors become one line on stderr and their exit status (see the module docstring)."""
    from .imageio import BadImageError

    def say(msg: str) -> None:
        print(f"morphfuse {name}: {msg}", file=sys.stderr)

    try:
        return int(mod.run(args) or 0)
    except OutputError as e:
        say(f"error: {_one_line(e)}")
        return EXIT_WRITE
    except UserError as e:
        # Several problems (e.g. every bad config key) stay on their own lines, after the one-line summary.
        lines = str(e).splitlines() or [""]
        say(f"error: {lines[0]}")
        for extra in lines[1:]:
            print(f"  {extra.strip()}", file=sys.stderr)
        return EXIT_USAGE
    except BadImageError as e:  # a file the stage needs whole (e.g. a mask given directly) is unusable
        say(f"error: {_one_line(e)}")
        return EXIT_USAGE
    except Interrupted as e:
        say(f"interrupted by signal {e.signum}: the work finished so far is kept; run the same command again "
            "to resume")
        return 128 + e.signum
    except KeyboardInterrupt:
        say("interrupted (Ctrl-C): the work finished so far is kept; run the same command again to resume")
        return 130
    except (UnicodeDecodeError,) + _input_errors() as e:
        # A library's reader failed on a malformed input file (not UTF-8, not YAML, not Parquet, not CSV): a user
        # error; the traceback is logged at debug level (-v).
        logging.getLogger("morphfuse").debug("input file error", exc_info=True)
        say(f"error: an input file could not be read: {_one_line(e)[:300]} (run with -v for the traceback)")
        return EXIT_USAGE
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):  # only ever about writing
            say(f"error: cannot write{where}: {describe_oserror(e)}")
            return EXIT_WRITE
        if where:  # a path the user gave: missing, a folder, no permission
            say(f"error: cannot use{where}: {describe_oserror(e)}")
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
