"""``python -m train TASK [options]``: the same as ``jaxloss-train``."""

import sys

from train.cli import main

sys.exit(main())
