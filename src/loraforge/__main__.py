"""`python -m loraforge ...` (and `torchrun -m loraforge train ...`): the CLI."""
import sys

from loraforge.cli import main

sys.exit(main())
