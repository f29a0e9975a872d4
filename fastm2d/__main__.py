"""`python -m fastm2d ...` is the `fastm2d` command."""
import sys

from .cli import main

sys.exit(main())
