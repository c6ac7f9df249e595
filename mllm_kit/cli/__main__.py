import sys

from mllm_kit.cli.main import main

sys.exit(main())
