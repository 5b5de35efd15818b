import sys

from retrace.cli import main

sys.exit(main())
