"""`python -m raymb.cli`: the `raymb` command."""

import sys

from raymb.cli.main import main

sys.exit(main())
