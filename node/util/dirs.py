"""Where a node or an agent keeps its identity, ledger and caches."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    return Path(os.environ.get("SHIZA_HOME", Path.home() / ".shiza"))
