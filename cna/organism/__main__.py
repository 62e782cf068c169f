"""`python -m cna.organism [overrides]`: train the organism described by conf/organism.yaml."""

import logging
import sys

from cna.errors import CnaError
from cna.organism import make_organism, organism_config


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = make_organism(organism_config(argv))
    except CnaError as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
