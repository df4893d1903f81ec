import sys

from pdserve.worker_base import Role
from pdserve.worker_main import main

sys.exit(main(Role.PREFILL))
