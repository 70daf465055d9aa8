"""`python -m llavakit.train`: the original LLaVA train.py / train_mem.py command line, with its defaults.

`torchrun ... llava/train/train_mem.py --model_name_or_path ...` becomes
`torchrun ... -m llavakit.train --model_name_or_path ...`; the flags stay as they are.
"""

import sys

from llavakit.cli import main

sys.exit(main(["train", "--defaults", "original", *sys.argv[1:]]))
