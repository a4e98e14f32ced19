"""Suite-wide setup."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def converted_model_cache(tmp_path_factory):
    """Convert the embedded GGUF model once per test run, not once per module: every
    engine, server and subprocess started by the tests shares this weight cache. A
    developer's own PAGEDSERVE_CACHE_DIR is left alone."""
    if "PAGEDSERVE_CACHE_DIR" in os.environ:
        yield os.environ["PAGEDSERVE_CACHE_DIR"]
        return
    path = str(tmp_path_factory.mktemp("pagedserve-cache"))
    os.environ["PAGEDSERVE_CACHE_DIR"] = path
    yield path
    del os.environ["PAGEDSERVE_CACHE_DIR"]
