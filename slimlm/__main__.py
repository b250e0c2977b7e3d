"""`python -m slimlm` -> the CLI."""
import sys

from .cli import main

sys.exit(main())
