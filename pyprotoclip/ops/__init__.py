"""Public operator API. Importing this module loads the compiled kernels (when built) and registers
their fakes and autograd, so ``torch.ops.pyprotoclip.*`` is usable with autograd and torch.compile."""

from pyprotoclip.ops.infonce import infonce_loss, similarity_cross_entropy
from pyprotoclip.ops.checks import skip_value_checks
from pyprotoclip.ops.kmeans import METRICS as KMEANS_METRICS
from pyprotoclip.ops.kmeans import kmeans_update
from pyprotoclip.ops.proto_softmax import proto_assign, proto_cross_entropy

__all__ = [
    "KMEANS_METRICS",
    "infonce_loss",
    "kmeans_update",
    "proto_assign",
    "proto_cross_entropy",
    "similarity_cross_entropy",
    "skip_value_checks",
]
