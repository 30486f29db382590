"""`python -m cookbook`: see cookbook.cli."""
from .cli import main
from .stop import exit_now

exit_now(main())
