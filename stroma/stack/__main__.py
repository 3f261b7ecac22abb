"""``python -m stroma.stack``: see :func:`stroma.stack.main`."""

import sys

from stroma.stack import main

sys.exit(main())
