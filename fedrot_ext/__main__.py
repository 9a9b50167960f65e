"""``python -m fedrot_ext aggregate ...``: the same as the ``fedrot-aggregate`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "aggregate":
        print("usage: python -m fedrot_ext aggregate CLIENT_DIR... --out OUT_DIR [options] (see fedrot-aggregate --help)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[2:]))
