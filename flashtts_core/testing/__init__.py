"""FlashTTS test kit: conformance suites for backends and tiny-checkpoint builders.

Shipped in the wheel so third-party backend plugins can run the same conformance suite. Submodules are imported
lazily (``from flashtts_core.testing.conformance import BackendConformance``): importing this package imports no
runtime, no builder and not even pytest (``flashtts serve --demo`` uses the builders without a test run).
"""

from __future__ import annotations

import sys

__all__: tuple[str, ...] = ()

# The conformance checks are plain ``assert`` statements; without pytest's rewriting a failure in a plugin's test run
# would show no values. Registration must happen before the module is first imported, and only matters inside a
# pytest process, where pytest is already imported: so look it up instead of importing it.
_pytest = sys.modules.get("pytest")
if _pytest is not None:
    try:
        _pytest.register_assert_rewrite("flashtts_core.testing.conformance")
    except (AttributeError, ImportError):  # a stub or a broken pytest: no rewriting, plain asserts still work
        pass
