"""The pruning core: NumPy in, NumPy out, no Lightning.

Stages of the paper's pipeline, each usable alone:

- :func:`spherical_kmeans` - faiss k-means on unit vectors, sample-trained, block-assigned;
- :func:`semdedup` - near-duplicate removal inside clusters (SemDeDup);
- :func:`clip_score_filter` - image-caption CLIP similarity filter;
- :func:`cluster_complexity`, :func:`dbp_quotas`, :func:`dbp_select` - Density-Based Pruning;
- :func:`ssp_select`, :func:`random_select` - the baselines;
- :func:`prune` - the stages in order, from an embedding store or an array.
"""

from .clip_score import clip_score_filter
from .complexity import ClusterComplexity, cluster_complexity
from .embeddings import Embeddings
from .groups import ClusterIndex, cluster_index
from .kmeans import KMeansResult, assign, spherical_kmeans
from .quotas import dbp_quotas
from .select import dbp_select, random_select, ssp_select
from .semdedup import duplicate_similarity, semdedup
from .pipeline import PruneResult, prune

__all__ = [
    "ClusterComplexity", "ClusterIndex", "Embeddings", "KMeansResult", "PruneResult", "assign",
    "clip_score_filter", "cluster_complexity", "cluster_index", "dbp_quotas", "dbp_select",
    "duplicate_similarity", "prune", "random_select", "semdedup", "spherical_kmeans", "ssp_select",
]
