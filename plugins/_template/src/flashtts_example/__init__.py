"""Example FlashTTS backend. Keep this module cheap to import: no runtime import here (see ``backend.py``)."""

from flashtts_example.backend import ExampleBackend, ExampleOptions

__all__ = ("ExampleBackend", "ExampleOptions", "__version__")

__version__ = "0.1.0"
