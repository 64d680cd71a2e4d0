"""Root conftest: loads the FlashTTS test kit's pytest plugin (markers, --run-gpu, tiny-checkpoint fixtures)."""

pytest_plugins = ["flashtts_core.testing.pytest_plugin"]
