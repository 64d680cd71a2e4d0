"""FlashTTS backend on PyTorch + transformers.

Importing this package is cheap on purpose (no torch, no transformers): the registry imports it to call
:meth:`TorchBackend.check_available`, and ``flashtts plugins`` must stay fast. torch is imported in ``startup()``.
"""

from flashtts_torch.backend import TorchBackend
from flashtts_torch.options import TorchOptions

__all__ = ("TorchBackend", "TorchOptions", "__version__")

__version__ = "0.1.0"
