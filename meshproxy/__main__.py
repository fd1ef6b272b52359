"""`python -m meshproxy` is the `meshproxy` command."""

import sys

from meshproxy.cli import main

sys.exit(main())
