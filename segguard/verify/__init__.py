"""Verification: prove a wall with real frames (probes, workers, expectations)."""
