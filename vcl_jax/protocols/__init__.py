"""The experiments' procedures as library code; ``experiments/`` only parses and calls."""
