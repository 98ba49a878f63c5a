"""Re-exports longjax/configs/pretrain.py, the real config, for loading by path."""
from longjax.configs.pretrain import *  # noqa: F401,F403
from longjax.configs.pretrain import get_config  # noqa: F401
