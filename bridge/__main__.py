"""Entry point: `python -m bridge COMMAND`."""
import sys

from .cli import main

sys.exit(main())
