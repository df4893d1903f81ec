"""``python -m pdserve.openai_api --router HOST:PORT --port 8000``."""

import sys

from pdserve.openai_api.cli import main

sys.exit(main())
