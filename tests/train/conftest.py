"""The trainer tests: in-process runs use this process's single CPU device; the
mesh, resume, checkpoint and multi-process tests run `python -m longjax.main`
(or a helper script) in subprocesses with their own device counts,
fast-compile flags and the session's compilation cache (`compile_cache`,
tests/conftest.py). Helpers: tests/train/train_testing.py."""
