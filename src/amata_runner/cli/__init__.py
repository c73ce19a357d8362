"""Console entry points (``amata-run``) and where their Hydra configs live."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """The ``conf/`` directory: inside the installed package (wheel) or at the repo root (editable).

    An absolute path, so the console script works from any working directory.
    """
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no conf/config.yaml next to {package}: is the package installed?")
