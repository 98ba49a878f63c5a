"""Re-exports longjax/configs/tiny.py, the real config, for loading by path."""
from longjax.configs.tiny import *  # noqa: F401,F403
from longjax.configs.tiny import get_config  # noqa: F401
