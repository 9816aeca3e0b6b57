import sys

from perturbdiff.cli import main

sys.exit(main())
