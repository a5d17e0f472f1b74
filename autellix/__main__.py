"""``python -m autellix``: the ``autellix`` command."""

import sys

from autellix.services.cli import main

sys.exit(main())
