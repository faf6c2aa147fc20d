"""Fused k-means update op (issue 5)."""
