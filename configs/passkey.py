"""Re-exports longjax/configs/passkey.py, the real config, for loading by path."""
from longjax.configs.passkey import *  # noqa: F401,F403
from longjax.configs.passkey import get_config  # noqa: F401
