// proto_softmax CPU kernels: filled in by the proto_softmax issue.
#include "../ops.h"
