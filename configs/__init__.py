"""Path-form config files (ml_collections loads `--config=configs/<name>.py` by path);
each re-exports longjax/configs/<name>.py, which is installed with the package."""
