"""The vocabulary below the steps: the facts, results and records the steps hand each other.

Plain frozen dataclasses (JSON through :class:`pipeline.core.receipts.JsonRecord`) and the pure rules
that read them; nothing here runs a program or reads a disk. ``guest/``, ``registry/``, ``domain/``,
``vmware/`` and the steps import from here, never from ``pipeline.steps``.
"""
