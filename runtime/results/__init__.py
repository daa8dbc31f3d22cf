"""keyreid.runtime.results: what is done with embeddings.

- ``gallery_store``: the cross-camera ``Gallery`` (entries, search, its file).
- ``gallery_index``: exact NumPy and FAISS search behind it.
- ``evaluation``: CMC and mAP under the tracklet protocol.
- ``query_gallery``: query/gallery splits for evaluation.
- ``ranking_figure``: the ranking picture.
"""
from keyreid.runtime.results.gallery_store import Gallery, Match

__all__ = ["Gallery", "Match"]
