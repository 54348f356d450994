"""DVC entry point of the extract stage; the work is in ``pipeline``."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["extract", *sys.argv[1:]])
