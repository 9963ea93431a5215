"""Preprocessing building blocks: pure functions on arrays and 4x4 affines (mm)."""
