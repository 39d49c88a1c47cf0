"""`python -m lmi_runtime` runs the CLI."""

import sys

from lmi_runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
