"""Environment for the Flower tests, set before any test module imports flwr or ray (both read it at
import time; the sandbox has no network)."""
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
