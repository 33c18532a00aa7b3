"""The shared command line: --dorefa parsing and mode conflicts."""
import os

import pytest

from conftest import load_script
from dorefanet.cli import Bits, check_modes, make_parser

SVHN = load_script("svhn-digit-dorefa.py")   # its default --dorefa is 1,2,4


def parse(argv):
    parser = make_parser(SVHN)
    return check_modes(parser, parser.parse_args(argv))


@pytest.mark.parametrize("text, expected", [
    ("1,2,6", Bits(1, 2, 6)), ("32,32,32", Bits(32, 32, 32)), ("t,32,32", Bits("t", 32, 32)),
    ("8, 8, 8", Bits(8, 8, 8)), ("1,1,32", Bits(1, 1, 32))])
def test_accepted_values(text, expected):
    bits = parse(["--dorefa", text]).dorefa
    assert bits == expected and str(bits) == str(expected)


@pytest.mark.parametrize("text, reason", [
    ("1,2", "three comma-separated"), ("a,b,c", "integer"), ("t,2,32", "implies A = G = 32"),
    ("0,2,4", "1 to 32"), ("1,2,33", "1 to 32"), ("1,t,32", "activation bit width (A)"), ("", "three"), ("1,,4", "three")])
def test_rejected_values_get_a_usage_error_with_a_reason(capsys, text, reason):
    with pytest.raises(SystemExit) as exc:
        parse(["--dorefa", text])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--dorefa" in err and reason in err


def test_default_is_shown_in_help(capsys):
    parser = make_parser(SVHN)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "(default: 1,2,4)" in out


@pytest.mark.parametrize("argv, message", [
    (["--eval"], "needs --load"),
    (["--load", "x.npz", "--eval", "--run", "a.png"], "cannot be combined"),
    (["--run", "a.png", "--json"], "needs --load"),
    (["--load", "x.npz", "--json", "--eval"], "--json only applies to --run")])
def test_conflicting_modes_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0,0", "a", "0,,1", "-1"])
def test_bad_gpu_lists_are_refused(capsys, monkeypatch, value):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(SystemExit):
        parse(["--gpu", value])
    assert "--gpu takes distinct comma-separated GPU ids" in capsys.readouterr().err
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_gpu_list_becomes_the_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parse(["--gpu", "1, 0"]).gpu == "1,0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,0"
