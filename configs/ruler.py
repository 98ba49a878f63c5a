"""Re-exports longjax/configs/ruler.py, the real config, for loading by path."""
from longjax.configs.ruler import *  # noqa: F401,F403
from longjax.configs.ruler import get_config  # noqa: F401
