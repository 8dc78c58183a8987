import sys

from shortened.cli import main

sys.exit(main())
