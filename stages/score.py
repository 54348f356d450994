"""DVC entry point of the score stage; the work is in ``pipeline``."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["score", *sys.argv[1:]])
