"""Run a command as on the light install (``pip install -e .``): the node extra is missing.

``light_env(dir)`` returns an environment whose PYTHONPATH starts with a folder holding a
``sitecustomize.py``. Python imports it at start-up; it puts a finder first on
``sys.meta_path`` that reports torch, transformers, vllm and the rest of the node extra as not
installed, and at exit writes a JSON report: which of them the process tried to import and
which it holds in ``sys.modules``. ``read_report`` checks that the report exists, which proves
that the finder ran in that very process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Distributions of the node extra that the base install does not pull in (pyproject.toml).
BLOCKED = ("torch", "transformers", "vllm", "safetensors", "gguf", "numpy")

_SITECUSTOMIZE = '''\
import atexit, json, os, sys

_BLOCKED = frozenset({blocked!r})
_TRIED = []


class _NodeExtraMissing:
    """Answers for the node extra's modules as an install without them would."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            _TRIED.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (light install)", name=name)
        return None


sys.meta_path.insert(0, _NodeExtraMissing())
_REPORT = os.environ.get("SHIZA_LIGHT_REPORT")


@atexit.register
def _report():
    if _REPORT:
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in _BLOCKED)
        with open(f"{{_REPORT}}.{{os.getpid()}}", "w") as f:
            json.dump({{"tried": sorted(set(_TRIED)), "loaded": loaded}}, f)
'''


def light_env(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) as a light install sees it; reports go under ``folder``."""
    site = folder / "light-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=tuple(BLOCKED)))
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env["SHIZA_LIGHT_REPORT"] = str(folder / "light-report")
    return env


def read_report(folder: Path) -> dict[str, list[str]]:
    """The report of the one light process that ran with ``light_env(folder)``, removed after."""
    files = sorted(folder.glob("light-report.*"))
    assert len(files) == 1, f"expected one report of a light-install process, found {files}"
    report: dict[str, list[str]] = json.loads(files[0].read_text())
    files[0].unlink()
    return report
