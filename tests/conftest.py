"""Shared test setup: put tests/ on sys.path so test modules can `import fakes` (tiny fake raw datasets); give the
subprocesses the tests start a temporary folder of their own, removed at the end (torchrun leaves a
`torchelastic_*` folder in $TMPDIR per launch)."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
SUBPROCESS_TMP = pytest.StashKey[str]()


def pytest_configure(config):
    tempfile.gettempdir()  # this process (pytest's own tmp_path folders) keeps the machine's temporary folder
    config.stash[SUBPROCESS_TMP] = os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="csdm-tests-subprocesses-")


def pytest_unconfigure(config):
    shutil.rmtree(config.stash[SUBPROCESS_TMP], ignore_errors=True)

