"""Scripts that time the library and print a table; results/ keeps what they measured, with the machine."""
import sys
from typing import NoReturn


def usage_error(message: str) -> NoReturn:
    """Refuse bad input in one line with argparse's exit status (2), before anything runs."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
