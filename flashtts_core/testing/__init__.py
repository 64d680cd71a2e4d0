"""FlashTTS test kit: conformance suites for backends and tiny-checkpoint builders.

Shipped in the wheel so third-party backend plugins can run the same conformance suite.
"""
