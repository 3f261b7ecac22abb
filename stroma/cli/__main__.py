"""``python -m stroma.cli``: the ``stroma`` command."""

import sys

from stroma.cli import main

sys.exit(main())
