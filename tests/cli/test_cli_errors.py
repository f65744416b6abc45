"""Bad input on the command line is one line on stderr and an exit code, never a traceback:
seeds outside 64 bits, text that is not UTF-8, a closed or full
stdout, a malformed bind address, layer layouts `dair up` would never get ready with.

Each case runs the real command as a subprocess; none of them gets as far as starting a process
or (for the checks made before it) loading the model.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from dair.bus.local import _command, free_port_pair
from dair.commands.layout import check_tiling, parse_split, stage_layout
from dair.errors import DairError

DAIR = _command("dair", "dair.cli")
BUS = _command("dair-bus", "dair.bus.main")


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    return subprocess.run(cmd, capture_output=True, timeout=120, env=env, **kw)


def _one_error_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, err
    return errors[0]


# --- --seed and -n ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where, seed", [("bus", "99999999999999999999999"), ("bus", "-1"),
                                         ("in-process", str(2**64)), ("in-process", "-1")])
def test_seed_outside_64_bits_is_refused(default_model, where, seed):
    # The bus path names an address where nothing listens: the seed is refused before any connection.
    extra = ["--bus", "tcp://127.0.0.1:1"] if where == "bus" else ["--model", str(default_model)]
    line = _one_error_line(_run(DAIR + ["generate", *extra, "--seed", seed, "--temperature", "0.7", "Hi"]))
    assert f"--seed {seed}: expected an integer from 0 to {2**64 - 1}" in line


def test_largest_seed_is_accepted(default_model, capsys):
    from dair.cli import main

    assert main(["generate", "--model", str(default_model), "--threads", "1", "--seed", str(2**64 - 1),
                 "--temperature", "1.0", "-n", "3", "--json", "Hi"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["seed"] == 2**64 - 1


def test_negative_max_tokens_is_refused():
    line = _one_error_line(_run(DAIR + ["generate", "--bus", "tcp://127.0.0.1:1", "-n", "-3", "Hi"]))
    assert "-n/--max-tokens -3: expected 0 or more" in line


# --- text that is not UTF-8 --------------------------------------------------------------------------
def test_non_utf8_prompt_names_the_bytes():
    line = _one_error_line(_run(DAIR + ["generate", b"\xff\xfeabc"]))
    assert "the prompt is not valid UTF-8 (0xff at byte 0, 0xfe at byte 1)" in line


def test_non_utf8_inside_a_prompt_counts_bytes_not_characters():
    line = _one_error_line(_run(DAIR + ["generate", "--stop", "é".encode() + b"x\x80", "Hi"]))
    assert "--stop is not valid UTF-8 (0x80 at byte 3)" in line


@pytest.mark.parametrize("cmd", [["tokenize", "-"], ["chat"]], ids=["tokenize", "chat"])
def test_non_utf8_stdin_is_refused(default_model, cmd):
    line = _one_error_line(_run(DAIR + [*cmd, "--model", str(default_model)], input=b"caf\xe9\n"))
    assert "not valid UTF-8" in line and "0xe9" in line


def test_non_utf8_score_file_is_refused(tmp_path, default_model):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"Le caf\xe9 est chaud.")
    line = _one_error_line(_run(DAIR + ["score", "--model", str(default_model), "--file", str(f)]))
    assert f"{f}: not valid UTF-8 (0xe9 at byte 6)" in line


# --- standard output closed, full, or a pipe whose reader left ------------------------------------------
def test_closed_stdout_is_one_line_and_an_error_code():
    r = subprocess.run(["bash", "-c", 'exec "$@" >&-', "bash", *DAIR, "generate", "-n", "4", "Hi"],
                       capture_output=True, timeout=120)
    assert _one_error_line(r, code=1).endswith("standard output is closed")


def test_full_stdout_is_one_line_and_an_error_code(default_model):
    with open("/dev/full", "w") as full:
        r = subprocess.run(DAIR + ["generate", "--model", str(default_model), "--threads", "1", "-n", "4",
                                   "--temperature", "0", "Hi"], stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert "cannot write to standard output: No space left on device" in _one_error_line(r, code=1)


def test_reader_leaving_the_pipe_ends_quietly(default_model):
    # `dair score ... | head -c 1`: the score table is larger than the pipe's buffer.
    p = subprocess.Popen(DAIR + ["score", "--model", str(default_model), "--threads", "1", "--top", "40",
                                 "--text", "The capital of France is Paris. " * 12],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(120) == 1 and "Traceback" not in err and "Exception ignored" not in err, err


# --- dair-bus --bind ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:7500;0.0.0.0:7600", "tcp://127.0.0.1:port", "tcp://127.0.0.1",
                                  "tcp://127.0.0.1:65535", "ipc:///tmp/dair.sock"])
def test_malformed_bind_address_is_refused(bind):
    line = _one_error_line(_run(BUS + ["--bind", bind]))
    assert f"--bind {bind!r}: expected tcp://HOST:PORT" in line


# --- dair up: the layout, checked before any process starts ---------------------------------------------
LAYOUT_ERRORS = {
    "gap": (["--split", "0-9,11-29"], "--split 0-9,11-29: layer 10 is in no range (the model's layers are 0-29)"),
    "overlap": (["--split", "0-9,5-29"], "--split 0-9,5-29: ranges 0-9 and 5-29 overlap on layers 5-9"),
    "zero": (["--stages", "0"], "--stages 0: expected at least 1 stage"),
    "duplicate": (["--split", "0-29,0-29"], "--split 0-29,0-29: range 0-29 is given twice"),
    "out-of-range": (["--split", "0-9,10-30"], "--split 0-9,10-30: layer range(s) 10-30 outside the model's "
                                               "layers 0-29"),
    "empty": (["--split", ""], "--split '': expected layer ranges like 0-9,10-19,20-29"),
    "syntax": (["--split", "0-9,x"], "--split 0-9,x: expected layer ranges like"),
    "reversed": (["--split", "0-9,19-10,20-29"], "range '19-10' must be A-B with 0 <= A <= B"),
    "negative": (["--stages", "-2"], "--stages -2: expected at least 1 stage"),
    "too-many": (["--stages", "31"], "--stages 31: the model has only 30 layers"),
    "standby": (["--standby", "-1"], "--standby -1: expected 0 or more"),
}


@pytest.mark.parametrize("case", ["gap", "overlap", "zero"])
def test_up_layout_errors_before_any_process(default_model, case):
    flags, message = LAYOUT_ERRORS[case]
    r = _run(DAIR + ["up", "--model", str(default_model), "--port", str(free_port_pair()), *flags])
    assert message in _one_error_line(r)
    assert b"(pid " not in r.stdout + r.stderr  # nothing was started


@pytest.mark.parametrize("case", sorted(LAYOUT_ERRORS))
def test_up_layout_errors_in_process(default_model, capsys, case):
    """Every case through the same CLI entry, in this process (a subprocess each would cost seconds)."""
    from dair.cli import main

    flags, message = LAYOUT_ERRORS[case]
    assert main(["up", "--model", str(default_model), "--port", str(free_port_pair()), *flags]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"dair: error: {err.splitlines()[0][len('dair: error: '):]}"]
    assert message in err and "(pid " not in out + err


def test_up_refuses_a_port_in_use(default_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _one_error_line(_run(DAIR + ["up", "--model", str(default_model), "--port", str(port)]))
    assert f"port {port} (the bus port) on 127.0.0.1 is in use" in line


def test_up_keys_refuses_a_stage_key_it_did_not_make(tmp_path, default_model):
    from dair.security import generate_keys

    generate_keys(tmp_path / "keys" / "stages", "laptop")
    r = _run(DAIR + ["up", "--model", str(default_model), "--port", str(free_port_pair()), "--keys",
                     str(tmp_path / "keys")])
    line = _one_error_line(r)
    assert f"{tmp_path / 'keys' / 'stages' / 'laptop.key'}: not made by dair up, yet the bus would admit it" in line
    assert b"(pid " not in r.stdout + r.stderr


def test_up_bad_restart_settings(tmp_path, default_model):
    cfg = tmp_path / "up.toml"
    cfg.write_text("[up]\ngive_up_deaths = 0\n")
    line = _one_error_line(_run(DAIR + ["up", "--model", str(default_model), "--config", str(cfg)]))
    assert "config [up]: expected" in line and "give_up_deaths" in line


def test_up_refuses_a_bad_max_ram_before_starting(default_model):
    r = _run(DAIR + ["up", "--model", str(default_model), "--port", str(free_port_pair()), "--max-ram", "lots"])
    assert "size 'lots': expected a number" in _one_error_line(r)
    assert b"(pid " not in r.stdout + r.stderr


def test_up_names_the_child_that_fails_at_start(tmp_path, default_model):
    cfg = tmp_path / "bad-stage.toml"
    cfg.write_text('[stage]\nmax_ram = "lots"\n')  # only the stages read it
    r = _run(DAIR + ["up", "--model", str(default_model), "--port", str(free_port_pair()), "--stages", "1",
                     "--threads", "1", "--config", str(cfg)])
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err
    # The stages' own errors are in their output; dair up's line says which child it was.
    mine = [ln for ln in err.splitlines() if ln.startswith("dair: error:")]
    assert len(mine) == 1 and "exited with status 2 before the pipeline was ready" in mine[0], err
    assert mine[0].startswith("dair: error: stage0 (layers 0-29, pid "), err


# --- the layout checks themselves (pure functions) ------------------------------------------------------
def test_layout_accepts_tilings_in_any_order():
    assert stage_layout(30, split="20-29,0-9,10-19") == [(20, 29), (0, 9), (10, 19)]
    assert stage_layout(30, split="0-3,4-28,29") == [(0, 3), (4, 28), (29, 29)]
    assert stage_layout(30, stages=4) == [(0, 7), (8, 15), (16, 22), (23, 29)]
    assert stage_layout(30, config_stages=[{"layers": "0-14"}, {"layers": "15-29"}]) == [(0, 14), (15, 29)]


def test_layout_names_every_gap_and_overlap():
    with pytest.raises(DairError, match=r"layers 3-4, 8 are in no range"):
        check_tiling(parse_split("0-2,5-7,9-9"), 10, "x")
    with pytest.raises(DairError, match=r"ranges 0-5 and 3-9 overlap on layers 3-5"):
        check_tiling(parse_split("0-5,3-9"), 10, "x")
    with pytest.raises(DairError, match=r"config \[\[stages\]\]: every entry needs layers"):
        stage_layout(30, config_stages=[{"host": "a"}])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
