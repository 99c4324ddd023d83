"""`python -m vlmkit.cli`."""

import sys

from vlmkit.cli import main

sys.exit(main())
