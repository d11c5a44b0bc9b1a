import sys

from pipeline.app.cli import main

sys.exit(main())
