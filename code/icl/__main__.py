import sys

from icl.cli import main

sys.exit(main())
