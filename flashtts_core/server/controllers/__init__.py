"""Route handlers, grouped by API: native FlashTTS routes, OpenAI-compatible routes, public system routes."""

from __future__ import annotations

__all__ = ()
