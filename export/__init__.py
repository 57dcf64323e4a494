"""cosine.export."""
