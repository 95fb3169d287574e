"""``python -m feclip.report``: the ``feclip-report`` command line (:mod:`feclip.apps.report`)."""

import sys

from feclip.apps.report import main

if __name__ == "__main__":
    sys.exit(main())
