"""Native reader for Norton/Symantec Ghost ``.GHO`` images (see ``../shared/gho/FORMAT.md``)."""
