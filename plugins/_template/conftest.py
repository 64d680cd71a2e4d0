"""Root conftest of the plugin repository: loads the FlashTTS test kit (markers, --run-gpu, tiny models)."""

pytest_plugins = ["flashtts_core.testing.pytest_plugin"]
