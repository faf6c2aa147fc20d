"""pyprotoclip: prototype-based contrastive language-image pretraining with fused operators."""

from pyprotoclip import ops  # loads the kernels; registers fakes and autograd
from pyprotoclip import models  # noqa: F401  the tiny configs become visible to open_clip once it is imported
from pyprotoclip._library import library_path
from pyprotoclip.ops._backend import build_info

__version__ = "0.1.0"
__all__ = ["build_info", "library_path", "ops", "__version__"]
