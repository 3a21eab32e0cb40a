"""Registers the test feature extractor in every Python process started with this folder on
PYTHONPATH (the scripts run as subprocesses by the evaluation tests)."""
import fid_extractor  # noqa: F401
