"""DVC entry point of the featurize stage; the work is in ``pipeline``."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["featurize", *sys.argv[1:]])
