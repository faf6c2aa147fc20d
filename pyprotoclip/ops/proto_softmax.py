"""Prototype-assignment softmax ops (issue 4)."""
