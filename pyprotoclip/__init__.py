"""pyprotoclip: prototype-based contrastive language-image pretraining with fused operators."""

from pyprotoclip._library import build_info, library_path

__version__ = "0.1.0"
__all__ = ["build_info", "library_path", "__version__"]

from pyprotoclip import ops  # noqa: E402,F401  (loads the kernels; registers fakes and autograd)
