"""pyprotoclip.train."""
