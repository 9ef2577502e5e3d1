"""Analyses over traces: heatmaps, ablations, attributions, statistics (imported as `cliviz.analyses`)."""
