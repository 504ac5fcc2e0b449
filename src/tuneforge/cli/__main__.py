"""`python -m tuneforge.cli ...` (used by the multi-process launcher and the tests)."""

import sys

from tuneforge.cli import main

sys.exit(main())
