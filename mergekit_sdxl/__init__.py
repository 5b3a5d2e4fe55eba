"""mergekit_sdxl: streaming, reproducible SDXL / SD1.5 checkpoint merging.

Nothing heavy is imported here so that `mergekit-sdxl --help` answers fast.
"""

__version__ = "0.1.0"
