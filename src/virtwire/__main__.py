import sys

from virtwire.cli import main

sys.exit(main())
