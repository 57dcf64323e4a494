import sys

from cosine.bench import main

sys.exit(main())
