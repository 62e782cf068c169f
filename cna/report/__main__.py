"""python -m cna.report DIR [--out OUT]"""

import sys

from cna.report.summary import main

sys.exit(main())
