"""`python -m digitune`: the `digitune` command."""

import sys

from digitune.cli import main

sys.exit(main())
