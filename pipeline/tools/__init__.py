"""Wrappers around external programs. All of them run through :func:`pipeline.tools.run.run`."""
