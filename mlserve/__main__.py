"""``python -m mlserve``."""

from mlserve.cli import main

main()
