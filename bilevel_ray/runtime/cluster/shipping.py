"""Shipping the user's problem factory to Ray's workers: a ``file.py:factory`` string or a
callable from the user's own code goes by value, with the user's modules it imports, since the
workers run elsewhere and cannot import the user's files."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path
from typing import Any

from bilevel_ray.problems import load_factory

__all__ = ["portable_factory"]


def portable_factory(factory: Any) -> Any:
    """What the workers receive: a ``file.py:factory`` string becomes the callable itself, and a
    callable from the user's own code (a module outside the installed packages) goes with its
    module shipped by value, together with the user's modules it imports: workers run elsewhere
    and cannot import the user's files. Built-in names, ``package.module:factory`` strings and
    installed packages' callables go as they are."""
    if isinstance(factory, str) and ".py:" not in factory:
        return factory
    resolved = load_factory(factory) if isinstance(factory, str) else factory
    module = sys.modules.get(getattr(resolved, "__module__", ""), None)
    if module is None or not _users_own(module):
        return resolved
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)
    for other in list(sys.modules.values()):
        if other is not module and _users_own(other) and _beside(other, module):
            cloudpickle.register_pickle_by_value(other)
    return resolved


def _users_own(module: Any) -> bool:
    """A module of the user's own code: a file outside Python's standard library, the installed
    packages (``site-packages``) and bilevel_ray (``__main__`` is pickled by value already)."""
    file = getattr(module, "__file__", None)
    if not file or module.__name__ == "__main__":
        return False
    path = Path(file).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    ours = Path(__file__).resolve().parents[2]  # the bilevel_ray package
    installed = {"site-packages", "dist-packages"} & set(path.parts)
    return not installed and stdlib not in path.parents and ours not in path.parents


def _beside(module: Any, factory_module: Any) -> bool:
    """Whether ``module`` lives in the factory's folder (or below it): the user's own imports."""
    folder = Path(factory_module.__file__).resolve().parent
    return folder in Path(module.__file__).resolve().parents
