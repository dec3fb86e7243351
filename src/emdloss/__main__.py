"""``python -m emdloss``: the ``emdloss`` command, which lives in :mod:`emdloss_lab.cli`."""

import sys

from emdloss_lab.cli import main

sys.exit(main())
