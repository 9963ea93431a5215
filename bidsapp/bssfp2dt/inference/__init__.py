"""Whole-volume prediction: device choice and sliding-window inference."""
