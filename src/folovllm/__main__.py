import sys

from folovllm.cli import main

sys.exit(main())
