"""Re-exports longjax/configs/base.py, the real config, for loading by path."""
from longjax.configs.base import *  # noqa: F401,F403
from longjax.configs.base import get_config  # noqa: F401
