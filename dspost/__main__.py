import sys

from dspost.cli import main

sys.exit(main())
