"""icl: the package behind the book *How language models learn in context*.

The book's chapters never compute anything themselves. They ask :mod:`icl.book` for results, which come
from :mod:`icl.cache`; a cache entry is produced by an experiment in :mod:`icl.experiments`, which runs a
model loaded by :mod:`icl.models` on prompts built by :mod:`icl.tasks` and scored by :mod:`icl.scoring`.
The command line (``python -m icl``) fills the cache and builds the book.
"""

from icl.errors import ICLError

__all__ = ["ICLError"]
__version__ = "0.1.0"
