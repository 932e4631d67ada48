"""Node orchestration: config, data dir, identity, runtime."""

__version__ = "0.1.0"
