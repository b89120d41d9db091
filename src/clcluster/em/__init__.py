"""Alignment and EM: polar scans, annealed and hard EM, split-and-merge, ML2D, class averages."""
