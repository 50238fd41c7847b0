"""Run configs: each module's `get_config()` returns the ConfigDict `run.py --config` loads."""
