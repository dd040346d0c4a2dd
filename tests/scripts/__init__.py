"""Scripts the tests run in subprocesses (not collected as tests)."""
