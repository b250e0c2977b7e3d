"""The CI contract: under `make test` a dependency that setup installs is never silently missing."""
from __future__ import annotations

import pytest
from conftest import _missing


def test_missing_dependency_fails_under_make_test(monkeypatch):
    monkeypatch.setenv("SLIMLM_REQUIRE_DEPS", "1")
    with pytest.raises(pytest.fail.Exception, match="make test installs it"):
        _missing("slimlm_no_such_module", "slimlm_no_such_module is not installed")


def test_missing_dependency_skips_outside_make_test(monkeypatch):
    monkeypatch.delenv("SLIMLM_REQUIRE_DEPS", raising=False)
    with pytest.raises(pytest.skip.Exception):
        _missing("slimlm_no_such_module", "slimlm_no_such_module is not installed")
    _missing("json", "json is part of Python")  # present: neither skips nor fails
