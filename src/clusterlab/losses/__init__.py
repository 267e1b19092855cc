"""Losses as small pure functions; each docstring states the equation and the paper it comes from."""
