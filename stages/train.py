"""DVC entry point of the train stage; the work is in ``pipeline``."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
