"""FlashTTS backend on SGLang's offline engine.

Importing this package is cheap on purpose (no sglang, no torch): the registry imports it to call
:meth:`SglangBackend.check_available`, and ``flashtts plugins`` must stay fast. sglang is imported in ``startup()``.
"""

from flashtts_sglang.backend import SglangBackend
from flashtts_sglang.options import SglangOptions

__all__ = ("SglangBackend", "SglangOptions", "__version__")

__version__ = "0.1.0"
