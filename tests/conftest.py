"""Session-wide test settings: logitstore's user cache points into the session's temporary
directory, so no test writes to (or reads a stale file from) the home directory's cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _user_cache_in_tmp(tmp_path_factory):
    # vocabulary maps default to $LOGITSTORE_CACHE/vocab_maps; subprocesses inherit it
    before = os.environ.get("LOGITSTORE_CACHE")
    os.environ["LOGITSTORE_CACHE"] = str(tmp_path_factory.mktemp("logitstore_cache"))
    yield
    if before is None:
        os.environ.pop("LOGITSTORE_CACHE", None)
    else:
        os.environ["LOGITSTORE_CACHE"] = before
