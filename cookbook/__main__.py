"""`python -m cookbook`: see cookbook.cli."""
import sys

from .cli import main

sys.exit(main())
