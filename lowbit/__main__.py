"""``python -m lowbit``, as ``torchrun -m lowbit eval …`` runs it: the command line."""

import sys

from lowbit.cli.main import main

sys.exit(main())
