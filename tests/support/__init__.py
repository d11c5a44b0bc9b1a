"""Test support shared by the tests and the benchmarks (``bench/``): fixture disks (``fx_disks``), a
system libvirtd (``fx_libvirtd``), CLI/config helpers (``fx_pipeline``), the GHO test writers
(``gho_writer``, ``gho_ntfs_writer``) and checks (``gho_checks``), the seeded fuzz generators
(``fuzz_gho``, ``fuzz_inputs``) and the ghost64.exe stand-in (``fakes/ghost64_standin.py``, run as a
program). Imported as ``tests.support.<module>`` from the repo root (pytest's ``pythonpath``,
``python -m bench.<name>``)."""
