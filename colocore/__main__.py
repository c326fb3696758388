import sys

from colocore.cli import main

sys.exit(main())
