"""pyprotoclip.cluster: k-means (L2 / spherical) on torch tensors, single- or multi-rank."""

from pyprotoclip.cluster.kmeans import KMeans, kmeans_plusplus, split_empty_clusters

__all__ = ["KMeans", "kmeans_plusplus", "split_empty_clusters"]
