"""FlashTTS backend on llama.cpp through llama-cpp-python.

Importing this package is cheap on purpose (no llama_cpp, no numpy): the registry imports it to call
:meth:`LlamaCppBackend.check_available`, and ``flashtts plugins`` must stay fast. llama_cpp is imported in
``startup()``.
"""

from flashtts_llamacpp.backend import LlamaCppBackend
from flashtts_llamacpp.options import LlamaCppOptions

__all__ = ("LlamaCppBackend", "LlamaCppOptions", "__version__")

__version__ = "0.1.0"
