import sys

from cna.cli import main

sys.exit(main())
