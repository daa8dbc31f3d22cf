"""What names an archive gallery and how it is searched by default: read by the gallery command
without LanceDB, and by the archive itself (``archive_gallery``)."""
from pathlib import Path
from typing import Union

INDEX_MIN_ROWS = 4096              # below this an exact scan is quick, and IVF-PQ trains poorly
DEFAULT_NPROBES = 32               # IVF partitions searched per query
DEFAULT_REFINE_FACTOR = 20         # candidates re-ranked exactly: refine_factor x k
OUTPUT_CHUNK_ROWS = 512            # batch.py rows read at a time when building (ViT-B: 40 MB)


def is_archive_location(location: Union[str, Path]) -> bool:
    """True for what names an archive gallery: a URI (``s3://...``), or a path that does not end
    in .npz (a folder, existing or to be made)."""
    text = str(location)
    return "://" in text or not text.lower().endswith(".npz")
