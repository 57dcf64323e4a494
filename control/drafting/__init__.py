"""cosine.control.drafting: the draft phase of a round and the algorithms it uses."""
