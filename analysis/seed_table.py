"""The seed's results table, measured: the report's results section alone, printed as markdown.

    python -m analysis.seed_table [--experiment seed-table]
"""
from __future__ import annotations

import argparse
import sys

from analysis import load, sections
from analysis.select import with_scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.seed_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="seed-table")
    args = parser.parse_args(argv)
    try:
        load.check_store()
        section = sections.results_table(with_scale(load.training_runs(args.experiment)))
    except sections.Skip as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except load.READ_ERRORS as e:
        print(load.refusal(e), file=sys.stderr)
        return 2
    print(section.text + "\n")
    print(sections.markdown_table(section.tables["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
