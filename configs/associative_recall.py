"""Re-exports longjax/configs/associative_recall.py, the real config, for loading by path."""
from longjax.configs.associative_recall import *  # noqa: F401,F403
from longjax.configs.associative_recall import get_config  # noqa: F401
