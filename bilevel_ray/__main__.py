"""``python -m bilevel_ray`` is the ``bilevel-ray`` command."""

import sys

from bilevel_ray.cli import main

sys.exit(main())
