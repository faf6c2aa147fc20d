// kmeans CUDA kernels: filled in by the kmeans issue.
#include "../ops.h"
