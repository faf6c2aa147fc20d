"""pyprotoclip.eval."""
