"""Build of the C extension; everything else about the package is in pyproject.toml.

``pipeline.gho._native`` (Fast-LZ decoder and cipher of the GHO reader) is compiled here, at install
time (``pip install -e .`` / ``make venv``; Debian: gcc and python3-dev, see scripts/setup-system.sh).
``optional=True``: without a compiler the install still succeeds and the reader uses its pure-Python
code (pipeline/gho/native.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pipeline.gho._native", ["pipeline/gho/_native.c"],
                             extra_compile_args=["-O2"], optional=True)])
