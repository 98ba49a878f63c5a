"""Re-exports longjax/configs/summarize.py, the real config, for loading by path."""
from longjax.configs.summarize import *  # noqa: F401,F403
from longjax.configs.summarize import get_config  # noqa: F401
