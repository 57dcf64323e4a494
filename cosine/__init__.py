"""cosine: collaborative speculative inference.

Small drafter models propose tokens, a large target model verifies a whole token tree
in one pass; the output is exactly the target's.
"""

__version__ = "0.1.0"
