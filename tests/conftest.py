"""Shared fixtures. Tests mirror the package layout (tests/ml/processing, tests/infra, ...)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The wider corpus lives beside the checkout on the team's machines and in CI; a user's clone has none.
CORPUS = Path(os.environ.get("ULTRASHAPE_CORPUS", ROOT.parent / "shared" / "corpus"))
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session", autouse=True)
def _session_tmpdir(tmp_path_factory):
    """Temp files of the code under test (and of the processes it starts) go under pytest's own base folder, which
    pytest prunes, rather than piling up in /tmp: e.g. each watchdog test leaves its job's empty lock file."""
    import tempfile

    d = tmp_path_factory.getbasetemp() / "tmp"
    d.mkdir(exist_ok=True)
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(d)
    tempfile.tempdir = None  # recomputed from TMPDIR on next use
    yield d
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """../shared/corpus, or a clean skip where it is absent."""
    if not (CORPUS / "manifest.csv").is_file():
        pytest.skip(f"corpus not found at {CORPUS} (set ULTRASHAPE_CORPUS); only the team's machines have it")
    return CORPUS


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES


def pytest_collection_modifyitems(config, items):
    # Tests that use the corpus fixture get the `corpus` marker, so `-m "not corpus"` works.
    for item in items:
        if "corpus_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.corpus)
