"""Model-family independent helpers (strict checkpoint loading).

Nothing here imports torch at module level: the submodules import it inside the functions that need it.
"""

from __future__ import annotations

__all__ = ()
