"""Fixtures of the refusal tests (tests/conftest.py's ``no_ray`` and ``ray_2cpu`` apply too)."""

from __future__ import annotations

import pytest

from .catalogue import start_children


@pytest.fixture
def no_compare_ray(no_ray, monkeypatch):
    """conftest's ``no_ray``, and compare's own reference to ``connect`` refused too."""
    from bilevel_ray.runtime.compare import driver as compare

    def refuse(*args, **kwargs):
        raise no_ray("the input reached Ray before it was refused")

    monkeypatch.setattr(compare, "connect", refuse)
    return no_ray


@pytest.fixture(scope="module")
def children(request, tmp_path_factory):
    """The ``process`` cases of the module's ``CASES`` as ``python -m bilevel_ray`` children,
    started together; case id -> (folder, files before, child)."""
    yield from start_children(request.module.CASES, tmp_path_factory)
