"""Built-in TTS engines, one sub-package per model family.

Each family is registered in the ``flashtts.engines`` entry-point group by flashtts-core's own metadata.
"""
