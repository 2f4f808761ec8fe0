"""Collect bench_*.py here as test modules.

pytest's python_files (test_*.py) is set for tests/ in the project's pytest.ini; rather than
widen it for every directory or add a bench/pytest.ini (which would move the rootdir), this
hook, which pytest consults only for files under bench/, collects bench_*.py as modules.
Run with `pytest bench/ --benchmark-only` (the default testpaths never include bench/).
"""
from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself: collecting it here too would
    # run every benchmark twice.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
