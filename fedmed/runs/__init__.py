"""Whole runs: composing a config, simulation, the baselines, the Flower App entry."""
