"""``python -m kdray`` is the ``kdray`` command."""

import sys

from kdray.cli import main

sys.exit(main())
