"""cosine.control."""
