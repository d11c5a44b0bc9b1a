"""The test suite (a package, so that tests and bench import ``tests.support`` without ``sys.path`` edits)."""
