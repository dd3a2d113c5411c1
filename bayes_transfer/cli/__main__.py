"""``python -m bayes_transfer.cli ...`` (as ``bayes-transfer ...``; ``launch`` uses it)."""
import sys

from bayes_transfer.cli import main

sys.exit(main())
