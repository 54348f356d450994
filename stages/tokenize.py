"""DVC entry point of the tokenize stage; the work is in ``pipeline``."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["tokenize", *sys.argv[1:]])
