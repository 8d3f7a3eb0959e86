"""``python -m rkld``: the same as the ``rkld`` command."""
import sys

from .cli import main

sys.exit(main())
