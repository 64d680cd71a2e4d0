"""FlashTTS backend on vLLM's async engine.

Importing this package is cheap on purpose (no vllm, no torch): the registry imports it to call
:meth:`VllmBackend.check_available`, and ``flashtts plugins`` must stay fast. vLLM is imported in ``startup()``.
"""

from flashtts_vllm.backend import VllmBackend
from flashtts_vllm.options import VllmOptions

__all__ = ("VllmBackend", "VllmOptions", "__version__")

__version__ = "0.1.0"
