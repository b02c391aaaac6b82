"""The trainer's command line without Swift: --help, the program's name, and
flags that cannot work refused in one line before any network call."""

import subprocess
import sys
from pathlib import Path

import pytest

from hapi import names, preprocess, protocol, zoo
from hapi.client import main as cli

ROOT = Path(__file__).resolve().parents[1]
JOB = ["--dataset", "d", "--model", "myalexnet", "-A", "http://127.0.0.1:1/auth/v1.0",
       "-U", "test:tester", "-K", "testing"]


def test_help_shows_examples():
    """Run as a script: ``python client/main.py`` puts client/ first on
    sys.path, where no module may shadow the standard library."""
    result = subprocess.run([sys.executable, "client/main.py", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python client/main.py ")
    examples = result.stdout.split("\nexamples:\n")[1]
    assert "python client/main.py --dataset digits --model myefficientnet_lite0" in examples
    assert "--testonly --checkpoint_dir ckpt" in examples


def test_the_parser_imports_no_torch():
    """``--help`` and bad flags answer at once: torch comes only after parsing."""
    probe = ("import sys; from hapi.client.main import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'hapi.zoo', 'hapi.client.train') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_feature_client_imports_nothing_of_the_storage_tier():
    probe = ("import sys, hapi.client.features; print(sorted(m for m in sys.modules if "
             "m.split('.')[0] in ('eventlet', 'aiohttp', 'swift') or "
             "m.startswith('hapi.middleware')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(("argv0", "prog"), [
    ("/opt/venv/bin/hapi-train", "hapi-train"),
    ("client/main.py", "python client/main.py"),
])
def test_the_program_names_itself_as_it_was_started(argv0, prog):
    assert cli.program_name(argv0) == prog
    parser = cli.build_parser(cli.program_name(argv0))
    assert parser.format_usage().startswith(f"usage: {prog} [-h]")
    assert f"\n  {prog} --dataset digits --model resnet18 --split_idx 0\n" in \
        parser.format_help()


def test_main_returns_its_exit_status(capsys):
    assert cli.main(["--help"]) == 0
    assert "examples:" in capsys.readouterr().out
    assert cli.main([*JOB, "--num_epochs", "0"]) == 2


def test_expected_errors_are_there_for_callers_of_run():
    from hapi.client.data import DataError
    from hapi.client.train import TrainingError

    assert {TrainingError, DataError, cli.SwiftAuthError} <= set(cli.EXPECTED_ERRORS)
    with pytest.raises(AttributeError):
        cli.NO_SUCH_NAME  # noqa: B018


def test_the_torch_free_names_are_those_of_the_zoo_and_protocol():
    assert tuple(zoo.MODELS) == names.MODELS
    assert tuple(preprocess.PRESETS) == names.PRESETS
    assert names.WIRE_DTYPES == protocol.WIRE_DTYPES
    assert (names.DEFAULT_PRESET, names.DEFAULT_WEIGHTS) == \
        (protocol.DEFAULT_PRESET, protocol.DEFAULT_WEIGHTS)


@pytest.mark.parametrize("model", ["alexnet", "resnet18"])
def test_layer_count_without_building_the_model(model):
    assert cli.layer_count(model) == len(zoo.build_model(model, seed=0))


@pytest.mark.parametrize(("flags", "message"), [
    (["--model", "lenet"], "--model: unknown model 'lenet'"),
    (["--weights", "file:w.safetensors"], "--weights file:w.safetensors: 'file:' names weights "
                                          "in a storage server's own folder"),
    (["--weights", "seed:x"], "--weights: seed must be an integer"),
    (["--model", "vit_b_16", "--preset", "resize-32"],
     "--preset resize-32: vit_b_16 takes only 224 px inputs; use a -224 preset"),
    (["--freeze", "--split_idx", "19"],
     "--split_idx 19 must be between 0 and the freeze index 18"),
    (["--split_idx", "3"], "freeze index 0: the storage tier only runs frozen layers (nothing "
                           "is frozen without --freeze or --freeze_idx)"),
    (["--freeze_idx", "23"], "--freeze_idx 23: alexnet has 22 layers; use at most 21"),
    (["--freeze_idx", "22"], "--freeze_idx 22 freezes all 22 layers of alexnet, leaving "
                             "nothing to train"),
    (["--use_intermediate"], "--use_intermediate needs the standalone HAPI server's URL"),
    (["--resume"], "--resume needs --checkpoint_dir or --checkpoint_container"),
    (["--resume", "--testonly", "--checkpoint_dir", "ckpt"],
     "--resume continues a training, --testonly only evaluates"),
    (["--checkpoint_every", "5"], "--checkpoint_every needs --checkpoint_dir"),
    (["--manual_split"], "--manual_split needs --split_idx N"),
    (["--freeze", "--plot", "p.png", "--split_idx", "4"], "--plot draws the automatic split"),
    (["--num_epochs", "0"], "--num_epochs 0: must be at least 1"),
    (["--batch_size", "-3"], "--batch_size -3: must be at least 1"),
    (["--prefetch", "-1"], "--prefetch -1: cannot be negative"),
    (["--retries", "-2"], "--retries -2: cannot be negative"),
    (["--start", "-5"], "--start -5: cannot be negative"),
    (["--freeze_idx", "-1"], "--freeze_idx -1: cannot be negative"),
    (["--lr", "-0.1"], "--lr -0.1: cannot be negative"),
    (["--timeout", "0"], "--timeout 0: must be above 0 seconds"),
    (["--holdout", "1"], "--holdout 1: must be in [0, 1)"),
    (["--split_tie", "1.5"], "--split_tie 1.5: must be in [0, 1)"),
    (["--manual_split", "--split_idx", "3", "--split_tie", "0.25"],
     "--split_tie 0.25 widens the automatic choice of the split, and --manual_split fixes"),
    (["--start", "10", "--end", "5"], "--end 5: must be above --start 10"),
    (["--num_epochs", "two"], "argument --num_epochs: invalid int value: 'two'"),
    (["--checkpoint_dir", "a", "--checkpoint_container", "b"],
     "argument --checkpoint_container: not allowed with argument --checkpoint_dir"),
])
def test_flags_that_cannot_work_are_one_line_before_any_network_call(
        monkeypatch, capsys, flags, message):
    def no_network(*args, **kwargs):
        raise AssertionError("a Swift connection before the flags were checked")

    monkeypatch.setattr(cli, "Connection", no_network)
    monkeypatch.delenv("HAPI_INTERMEDIATE_URL", raising=False)
    assert cli.main([*JOB, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err
    assert ": error: " in err and message in err


def test_a_missing_flag_is_one_line(capsys):
    assert cli.main(["--model", "alexnet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "error: the following arguments are required: --dataset/--container" in err
