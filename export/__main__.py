"""``python -m cosine.export`` = ``cosine-export``."""

import sys

from .cli import main

sys.exit(main())
