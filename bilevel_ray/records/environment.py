"""What ran a result: the code (bilevel_ray's version, a hash of its source and, from a git
checkout, the commit and whether the tree was dirty), the versions of the libraries it rests on
and the machine (CPU model and threads, GPU model and count).

Nothing here imports Ray, transformers or peft: their versions are read from the installed
packages' metadata.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "code_identity", "environment"]

PACKAGE = Path(__file__).resolve().parents[1]  # bilevel_ray/
PACKAGES = ("torch", "ray", "transformers", "peft", "pyarrow", "numpy")
GIT_TIMEOUT_S = 5.0


def code_identity() -> dict[str, Any]:
    """bilevel_ray's version, the SHA-256 of its source files (which tells two dirty trees, or
    two installs without git, apart) and the git commit of the checkout it runs from (None
    when it is not one, or git is absent)."""
    import bilevel_ray

    return {
        "bilevel_ray": bilevel_ray.__version__,
        "source_sha256": _source_digest(),
        "git": _git(),
    }


@functools.cache
def _source_digest() -> str:
    """The package's Python source, file by file in sorted order (cached: the code a process
    runs does not change under it)."""
    total = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        total.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
        total.update(hashlib.sha256(path.read_bytes()).digest())
    return total.hexdigest()


def _git() -> dict[str, Any] | None:
    """The commit and dirtiness of the git work tree holding the package, or None."""
    git = shutil.which("git")
    if git is None:
        return None
    root = PACKAGE.parent

    def ask(*args: str) -> str | None:
        try:
            done = subprocess.run(
                [git, "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = ask("rev-parse", "--show-toplevel")
    # An installed copy inside some other repository (a virtual environment in a project) is
    # not a checkout of bilevel_ray: its commit would describe another project.
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = ask("rev-parse", "HEAD")
    status = ask("status", "--porcelain", "--untracked-files=no")
    if commit is None:
        return None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment() -> dict[str, Any]:
    """Python, the libraries' versions (None where not installed) and the device."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "device": _device(),
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _device() -> dict[str, Any]:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if gpus else None,
        "gpu_count": gpus,
    }


@functools.cache
def _cpu_model() -> str:
    with contextlib.suppress(OSError):  # no /proc (macOS): the platform's own name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()
