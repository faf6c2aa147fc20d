"""pyprotoclip.data."""
