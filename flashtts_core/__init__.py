"""FlashTTS: fast LLM-based text-to-speech serving.

Importing this package is cheap: no torch, PyAV or runtime is imported here.
"""

__version__ = "0.1.0"

__all__ = ("__version__",)
