"""Core: config, settings, receipts, atomic writes, errors, safe reads of user files, logging."""
