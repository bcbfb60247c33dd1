"""Quarto's pre-render step for this book: chapters whose cached results changed lose their frozen
outputs, so Quarto executes them again (see icl.freeze)."""

import sys

from icl.freeze import main

sys.exit(main())
