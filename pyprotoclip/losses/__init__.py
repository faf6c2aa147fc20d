"""pyprotoclip.losses."""
