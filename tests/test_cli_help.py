"""CLI polish (issue 13 item 9): every option of every stage (and sub-stage) has help, no raw Sphinx/RST markup in
any --help, -v/-q accepted before and after the stage, and help examples name shards the way the workflow does."""
from __future__ import annotations

import argparse
import logging
import re

import pytest

from conftest import REPO
from morphfuse.cli import COMMANDS, build_parser, main, plain, stage_parser

TEST_HOOKS = {"--model-factory"}  # options for the tests only: hidden from --help (and nothing else is)
MARKUP = re.compile(r"``|:(?:func|class|mod|meth|attr|data|obj|exc|ref|doc):`")


def _parsers():
    """(path, parser) of every stage and sub-stage parser, as `morphfuse` builds them."""
    out = [(["morphfuse"], build_parser())]
    todo = [([name], stage_parser(name)) for name, _, _ in COMMANDS]
    while todo:
        path, p = todo.pop()
        out.append((path, p))
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [(path + [n], sp) for n, sp in a.choices.items()]
    return out


def test_every_option_of_every_stage_has_plain_help():
    missing, marked = [], []
    parsers = _parsers()
    assert len(parsers) > len(COMMANDS) + 3  # the sub-stages of forge and bulk are walked too
    for path, p in parsers:
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if a.help == argparse.SUPPRESS and set(a.option_strings) <= TEST_HOOKS:
                continue  # kept out of the user's --help on purpose
            if not (a.help or "").strip() or a.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}")
        text = p.format_help()
        if MARKUP.search(text):
            marked.append(f"{' '.join(path)}: {MARKUP.search(text).group(0)!r} in "
                          f"{text[max(0, MARKUP.search(text).start() - 40):MARKUP.search(text).end() + 20]!r}")
    assert not missing, missing
    assert not marked, marked


def test_plain_turns_roles_and_double_backticks_into_code():
    assert plain("see :func:`morphfuse.perturb.apply` and ``--out`` or :class:`~a.B`") == \
        "see `morphfuse.perturb.apply` and `--out` or `a.B`"


def test_help_examples_name_real_shards():
    bad = []
    for path, p in _parsers():
        for m in re.finditer(r"\bs\d{5}\b", p.format_help()):
            bad.append((" ".join(path), m.group(0)))
    assert not bad, bad  # the workflow names shards test_00000 / train_00000 (manifest) and 00000 (forge)
    train = stage_parser("train").format_help()
    assert "features/mitl/train_00000.npz" in train


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("flag,level", [("-v", logging.DEBUG), ("--verbose", logging.DEBUG),
                                        ("-q", logging.WARNING), ("--quiet", logging.WARNING)])
def test_verbose_and_quiet_before_or_after_the_stage(tmp_path, monkeypatch, where, flag, level):
    seen = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: seen.update(kw))
    stage = ["config", "--config", str(REPO / "config.yaml"), "--out", str(tmp_path / "eff.yaml")]
    assert main(stage) == 0 and seen["level"] == logging.INFO  # neither flag
    argv = [flag, *stage] if where == "before" else [*stage, flag]
    assert main(argv) == 0
    assert seen["level"] == level
    assert (tmp_path / "eff.yaml").is_file()


def test_verbose_and_quiet_together_is_a_usage_error(tmp_path, capsys):
    cfg = REPO / "config.yaml"
    with pytest.raises(SystemExit) as e:
        main(["-v", "config", "--config", str(cfg), "-q"])
    assert e.value.code == 2 and "exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["config", "--config", str(cfg), "-q", "-v"])
    assert e.value.code == 2


def test_the_model_factory_test_hook_is_not_in_the_users_help(capsys):
    for argv in (["train", "--help"], ["predict", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "--model-factory" not in capsys.readouterr().out
