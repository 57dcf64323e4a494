"""cosine.workers."""
