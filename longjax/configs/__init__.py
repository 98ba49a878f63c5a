"""The task configs, installed with the package so that they load from any directory.

Each module's `get_config(arg)` builds a config from `base.py`'s plus a small
delta; the module docstrings show the launch commands. From the repository root
`--config=configs/<name>.py` loads the same config through a file that re-exports
the module here (ml_collections loads config files by path).
"""
