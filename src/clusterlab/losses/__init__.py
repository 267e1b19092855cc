"""Losses as small pure functions; each module's docstring cites the paper (authors, venue, year, arXiv id) and the
upstream file (repository@commit path) the code reproduces, and each function's docstring states its equation."""
