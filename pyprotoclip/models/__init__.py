"""pyprotoclip.models."""
