"""pyprotoclip.cluster."""
