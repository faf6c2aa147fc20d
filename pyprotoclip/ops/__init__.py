"""Public operator API. Importing this module loads the compiled kernels (when built) and registers
their fakes and autograd, so ``torch.ops.pyprotoclip.*`` is usable with autograd and torch.compile."""

from pyprotoclip.ops.infonce import infonce_loss, similarity_cross_entropy

__all__ = ["infonce_loss", "similarity_cross_entropy"]
