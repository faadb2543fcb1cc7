"""`python -m moe_core` is the same CLI as `moe-lab`."""
import sys

from .cli import main

sys.exit(main())
