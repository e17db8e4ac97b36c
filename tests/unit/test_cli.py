"""The ``mtrec`` front door: help, version, exit codes, and outputs that never overwrite the user's files."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import mtrec_train.run
from mtrec.cli_help import HelpFormatter
from mtrec.data.contract import validate
from mtrec.io import OUTPUT_MARKER
from mtrec_app.cli import CONVERTERS, PASSTHROUGH, main

MTREC = Path(sys.executable).with_name("mtrec")  # the console script of this environment
SYNTH = ["data", "synth", "--users", "30", "--items", "20", "--interactions", "400"]


def _users_dir(path: Path) -> Path:
    """A directory the user made, holding a file of theirs."""
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


# ------------------------------------------------------------------------------- outputs


def test_synth_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    out = _users_dir(tmp_path / "mine")
    assert main([*SYNTH, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --out {out}: the directory holds files ray-mtrec did not write (notes.txt); "
        "choose another directory, or pass --force to write there anyway"
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary sibling left behind


def test_synth_with_force_writes_beside_the_users_files(tmp_path):
    out = _users_dir(tmp_path / "mine")
    assert main([*SYNTH, "--out", str(out), "--force"]) == 0
    assert validate(out) == [] and (out / "notes.txt").read_text() == "mine"
    assert not (out / OUTPUT_MARKER).exists()  # still the user's directory: the next write needs --force again
    assert main([*SYNTH, "--out", str(out)]) == 2
    assert main([*SYNTH, "--out", str(out), "--force", "--seed", "3"]) == 0
    assert validate(out) == [] and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_synth_rewrites_its_own_output(tmp_path):
    out = tmp_path / "ds"
    assert main([*SYNTH, "--out", str(out), "--seed", "1"]) == 0
    first = (out / "interactions.parquet").read_bytes()
    assert main([*SYNTH, "--out", str(out), "--seed", "2"]) == 0
    assert validate(out) == [] and (out / "interactions.parquet").read_bytes() != first


@pytest.mark.parametrize("converter", sorted(CONVERTERS))
def test_converters_refuse_before_reading_the_source(tmp_path, capsys, converter):
    out = _users_dir(tmp_path / "mine")
    missing = tmp_path / "no-such-source"  # the output check comes first: the source is never read
    assert main(["data", converter, "--src", str(missing), "--out", str(out)]) == 2
    assert "the directory holds files ray-mtrec did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "data"
    assert main([*SYNTH, "--out", str(out)]) == 0
    return out


def test_train_refuses_a_run_directory_it_did_not_write(tmp_path, capsys, dataset):
    run = _users_dir(tmp_path / "run")
    assert main(["train", "--data", str(dataset), "--out", str(run), "train.epochs=1"]) == 2
    assert "the directory holds files ray-mtrec did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


class RayStarting(Exception):
    """Raised where training would start Ray: the checks before it have passed."""


@pytest.mark.parametrize("force", [True, False])
def test_train_claims_its_own_or_a_forced_run_directory(tmp_path, monkeypatch, dataset, force):
    def no_ray(*args, **kwargs):
        raise RayStarting

    monkeypatch.setattr(mtrec_train.run, "local_ray", no_ray)
    run = _users_dir(tmp_path / "run") if force else tmp_path / "run"
    argv = ["train", "--data", str(dataset), "--out", str(run)]
    with pytest.raises(RayStarting):
        main([*argv, "--force"] if force else argv)
    assert (run / OUTPUT_MARKER).exists()
    assert (run / "notes.txt").exists() == force  # --force writes beside the user's files, deleting none
    with pytest.raises(RayStarting):  # a rerun into the run directory it marked needs no --force
        main(argv)


# ------------------------------------------------------------------------------- help and exit codes


def test_bare_mtrec_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mtrec") and all(f"\n    {cmd} " in err for cmd in ("data", *PASSTHROUGH))
    assert main(["data"]) == 2
    assert capsys.readouterr().err.startswith("usage: mtrec data")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"mtrec {version('ray-mtrec')}\n"


COMMANDS = [
    ["--help"],
    ["data", "--help"],
    *(["data", name, "--help"] for name in ("synth", "validate", *CONVERTERS)),
    *([name, "--help"] for name in PASSTHROUGH),
    ["serve", "config", "--help"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a[:-1]) or "mtrec")
def test_every_option_has_help_and_no_markup(monkeypatch, capsys, argv):
    shown: list[argparse.ArgumentParser] = []
    format_help = argparse.ArgumentParser.format_help

    def record(parser: argparse.ArgumentParser) -> str:
        shown.append(parser)
        return format_help(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", record)
    with pytest.raises(SystemExit) as e:
        main(argv)
    text = capsys.readouterr().out
    assert e.value.code == 0 and text.startswith("usage: mtrec")
    assert "``" not in text and ":func:" not in text and ":class:" not in text, text
    parsers = list(shown)
    for parser in parsers:  # sub-commands (cluster up/down/status) are checked with their parent
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
    for parser in parsers:
        assert parser.formatter_class is HelpFormatter, f"{parser.prog}: defaults not shown"
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                assert action.help, f"{parser.prog} {'/'.join(action.option_strings) or action.dest}: no help"


def test_defaults_are_shown(capsys):
    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 2000)" in text and "(default: ecommerce)" in text and "(default: None)" not in text


def test_serve_help_points_to_serve_config(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "mtrec serve config" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--help"], ["data", "validate", "{dataset}"]])
def test_a_closed_pipe_is_no_traceback(dataset, args):
    """`mtrec ... | head -1`: the reader is gone before mtrec writes."""
    argv = [str(MTREC), *(a.format(dataset=dataset) for a in args)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
