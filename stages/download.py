"""DVC entry point of the download stage; the work is in ``pipeline``."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["download", *sys.argv[1:]])
