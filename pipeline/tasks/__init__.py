"""Luigi tasks: thin wiring of inputs to outputs; the work lives in plain functions elsewhere."""

from pipeline.tasks.steps import (
    Convert,
    Define,
    GhostConvert,
    Inspect,
    MigrateAll,
    MigrateImage,
    RegistryMerge,
    XmlRender,
    chain,
)

__all__ = ["Convert", "Define", "GhostConvert", "Inspect", "MigrateAll", "MigrateImage", "RegistryMerge",
           "XmlRender", "chain"]
