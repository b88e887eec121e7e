"""Shared test setup: put tests/ on sys.path so test modules can `import fakes` (tiny fake raw datasets)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
