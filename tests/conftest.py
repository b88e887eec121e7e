"""Shared test setup: put tests/ on sys.path so test modules can `import fakes` (tiny fake raw datasets); give the
subprocesses the tests start a temporary folder of their own, removed at the end (torchrun leaves a
`torchelastic_*` folder in $TMPDIR per launch)."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    tempfile.gettempdir()  # this process (pytest's own tmp_path folders) keeps the machine's temporary folder
    config._subprocess_tmp = tempfile.mkdtemp(prefix="csdm-tests-subprocesses-")
    os.environ["TMPDIR"] = config._subprocess_tmp


def pytest_unconfigure(config):
    shutil.rmtree(config._subprocess_tmp, ignore_errors=True)

