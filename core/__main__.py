import sys

from llmpress.cli.main import main

sys.exit(main())
