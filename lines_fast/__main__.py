"""`python -m lines_fast ...` is `lines-fast ...`; torchrun runs it as `torchrun ... -m lines_fast merge ...`."""
import sys

from .cli import main

sys.exit(main())
