"""The light install on each Python that ``requires-python`` admits (issue 21, "Packaging").

``pyproject.toml`` claims 3.11 to 3.13; these tests hold it to that. The first checks that the
specifier admits exactly the versions tested here. Then, for each version: a wheel of this
checkout goes into a fresh venv made by that interpreter (``pip install`` with the machine's
indexes: the base dependencies only, no node extra), and in that venv ``shiza --version`` runs
through the real entry point, and a script imports the agent side and makes a protocol round trip
between two libp2p hosts on 127.0.0.1 (Noise, yamux, msgpack, Ed25519 signatures), with torch
neither installed nor imported. A missing interpreter, or no index offering wheels for it, is a
skip that says so; a failing install or check is a failure.

The node extra is not tested here: torch==2.13.0 CPU wheels exist only where a CPU index or a
local wheel is reachable (Makefile, ``TORCH``); on PyPI the Linux wheel is the CUDA build.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
SUPPORTED = ("3.11", "3.12", "3.13")
# A compiled dependency of the light install with wheels for every supported version: an index
# that lacks one for an interpreter cannot build the light install there (skip, not failure).
PROBE = "msgpack==1.2.4"

# Run inside the light venv with -I from a folder outside the checkout, so that only what was
# installed is importable.
CHECK = '''\
import hashlib, importlib.util, json, sys
import trio
import node.client.swarm
from node.net.host import open_host
from protocol.codec import pack, unpack
from protocol.identity import Identity, verify
from protocol.messages import InfoRequest, NodeInfo, decode_message, message_to_wire

PROTO = "/shiza-test/python-versions/1.0.0"


def seed(name):
    return hashlib.sha256(name.encode()).digest()


async def main():
    with trio.fail_after(30):
        async with open_host(seed("a")) as a, open_host(seed("b")) as b:
            async def answer(stream):
                request = decode_message(unpack(await stream.read_frame(1 << 16)))
                assert isinstance(request, InfoRequest), request
                info = NodeInfo(peer_id=b.peer_id, addrs=tuple(b.addrs),
                                version=sys.version.split()[0], state="online", spans=())
                await stream.send_frame(pack(message_to_wire(info)))

            b.set_handler(PROTO, answer)
            await a.connect(b.addrs[0])
            stream = await a.open_stream(b.peer_id, PROTO)
            await stream.send_frame(pack(message_to_wire(InfoRequest())))
            info = decode_message(unpack(await stream.read_frame(1 << 16)))
            server = b.peer_id
    signer = Identity.from_seed(seed("signer"))
    verify(signer.public_key, b"shiza-test\\x00", b"m", signer.sign(b"shiza-test\\x00", b"m"))
    return {"python": sys.version.split()[0], "node_file": node.client.swarm.__file__,
            "answered_by": info.peer_id, "server": server, "answer_version": info.version,
            "torch_installed": importlib.util.find_spec("torch") is not None,
            "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))}


print(json.dumps(trio.run(main)))
'''


def _run(args: list[str | Path], timeout_s: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout_s,
                          env=env, **kwargs)  # type: ignore[call-overload]


def _interpreter(version: str) -> str | None:
    """The first of ``pythonX.Y`` on PATH, pyenv's X.Y.* builds (newest first) and this
    interpreter that runs and is X.Y (a pyenv shim of a version not selected exits 127)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    builds = sorted(glob.glob(str(pyenv / "versions" / f"{version}.*" / "bin" / f"python{version}")),
                    key=lambda p: [int(x) for x in Path(p).parents[1].name.split(".") if x.isdigit()])
    for candidate in (shutil.which(f"python{version}"), *reversed(builds), sys.executable):
        if candidate is None:
            continue
        try:
            got = _run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], 60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if got.returncode == 0 and got.stdout.strip() == version:
            return candidate
    return None


def test_requires_python_admits_exactly_the_tested_versions() -> None:
    spec = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    for minor in range(6, 20):
        version = f"3.{minor}"
        admitted = all(spec.contains(f"{version}.{patch}") for patch in (0, 1, 20))
        assert admitted == (version in SUPPORTED), (
            f"requires-python {spec} {'admits' if admitted else 'rejects'} Python {version}; "
            f"the versions tested here are {', '.join(SUPPORTED)}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout's files (tracked and untracked-but-not-ignored), built outside it."""
    src = tmp_path_factory.mktemp("src")
    listed = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], 60)
    assert listed.returncode == 0, listed.stderr
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():  # deleted but not yet staged: absent
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, src], 600)
    assert built.returncode == 0, built.stderr[-4000:]
    (path,) = out.glob("shiza_node-*.whl")
    return path


@dataclass
class Install:
    """One version's light venv, or why there is none: ``skip`` (no interpreter, no index with
    its wheels) or ``failure`` (the install itself failed)."""
    venv: Path
    skip: str | None = None
    failure: str | None = None


def _install(version: str, wheel: Path, where: Path) -> Install:
    venv = where / "venv"
    python = _interpreter(version)
    if python is None:
        return Install(venv, skip=f"no Python {version} interpreter here (none of python{version} on PATH, "
                                  f"pyenv's versions/{version}.*, this one runs as {version})")
    made = _run([python, "-m", "venv", venv], 300)
    if made.returncode != 0:
        return Install(venv, failure=made.stderr)
    bin_dir = venv / "bin"
    probe = _run([bin_dir / "python", "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                  "-d", where / "probe", PROBE], 300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return Install(venv, skip=f"no package index reachable here offers a Python {version} wheel of "
                                  f"{PROBE}, so the light install cannot be built for it: {last}")
    installed = _run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], 900)
    if installed.returncode != 0:
        return Install(venv, failure=f"light install on Python {version} failed:\n{installed.stderr[-6000:]}")
    return Install(venv)


@pytest.fixture(scope="module")
def installs(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Install]]:
    """Every supported version's light venv (about 190 MB each), made at the same time (pip waits
    on the index and the disk as much as on a core), removed after the module, pass or fail."""
    roots = {v: tmp_path_factory.mktemp(f"py{v}") for v in SUPPORTED}
    with ThreadPoolExecutor(len(SUPPORTED)) as pool:
        made = dict(zip(SUPPORTED, pool.map(lambda v: _install(v, wheel, roots[v]), SUPPORTED)))
    yield made
    for install in made.values():
        shutil.rmtree(install.venv, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("version", SUPPORTED)
def test_light_install_works_on(version: str, wheel: Path, installs: dict[str, Install], tmp_path: Path) -> None:
    install = installs[version]
    if install.skip is not None:
        pytest.skip(install.skip)
    assert install.failure is None, install.failure
    venv, bin_dir = install.venv, install.venv / "bin"

    shiza = _run([bin_dir / "shiza", "--version"], 120, cwd=tmp_path)
    expected_version = wheel.name.split("-")[1]
    assert (shiza.returncode, shiza.stdout.strip()) == (0, f"shiza {expected_version}"), shiza.stderr

    (tmp_path / "check.py").write_text(CHECK)
    checked = _run([bin_dir / "python", "-I", tmp_path / "check.py"], 120, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr[-6000:]
    report = json.loads(checked.stdout.strip().splitlines()[-1])
    assert report["python"].rsplit(".", 1)[0] == version
    assert Path(report["node_file"]).is_relative_to(venv), report["node_file"]  # the wheel, not ROOT
    assert report["answered_by"] == report["server"] and report["answer_version"] == report["python"]
    assert (report["torch_installed"], report["loaded"]) == (False, [])
