import sys

from hotlora.server.cli import main

sys.exit(main())
