from analysis.cli import main
from cookbook.stop import exit_now

exit_now(main())
