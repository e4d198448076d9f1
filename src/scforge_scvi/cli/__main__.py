"""``python -m scforge_scvi.cli``: the ``scforge`` command line."""

import sys

from ._main import main

sys.exit(main())
