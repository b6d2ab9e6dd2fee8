"""``python -m parauni.cli``: the ``parauni`` command (e.g. under ``accelerate launch -m parauni.cli``)."""

import sys

from . import main

sys.exit(main())
