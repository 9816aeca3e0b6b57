"""``python -m perturbdiff.cli`` (what ``torchrun -m perturbdiff.cli train ...`` runs in every process)."""

import sys

from perturbdiff.cli import main

sys.exit(main())
