"""pyprotoclip: prototype-based contrastive language-image pretraining with fused operators."""

from pyprotoclip._library import build_info, library_path

__version__ = "0.1.0"
__all__ = ["build_info", "library_path", "__version__"]
