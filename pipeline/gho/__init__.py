"""Native reader for Norton/Symantec Ghost ``.GHO`` images (see ``docs/gho-format.md``).

Public API: :func:`read_info`, :func:`extract`, :class:`GhoError`, :class:`GhoInfo`, :class:`ExtractResult`.
"""

from pipeline.gho.errors import GhoError
from pipeline.gho.extract import ExtractResult, extract
from pipeline.gho.info import GhoInfo, PartitionInfo, read_info

__all__ = ["ExtractResult", "GhoError", "GhoInfo", "PartitionInfo", "extract", "read_info"]
