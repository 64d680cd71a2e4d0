"""FlashTTS backend on Apple MLX through mlx-lm.

Importing this package is cheap on purpose (no mlx, no mlx-lm): the registry imports it to call
:meth:`MlxBackend.check_available`, and ``flashtts plugins`` must stay fast. mlx is imported in ``startup()``.
"""

from flashtts_mlx.backend import MlxBackend
from flashtts_mlx.options import MlxOptions

__all__ = ("MlxBackend", "MlxOptions", "__version__")

__version__ = "0.1.0"
