"""Re-exports longjax/configs/translate.py, the real config, for loading by path."""
from longjax.configs.translate import *  # noqa: F401,F403
from longjax.configs.translate import get_config  # noqa: F401
