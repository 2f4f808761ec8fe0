"""pytest-benchmark suites (`pytest bench/ --benchmark-only`); a package so that its conftest
gets a module name of its own (bench.conftest) next to the tests' conftest."""
