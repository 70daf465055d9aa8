"""Files shipped inside the package.

`LLAMA_TOKENIZER_DIR`: the LLaMA / Vicuna SentencePiece vocabulary (32000 tokens) that LLaVA-1.5 and
LLaVA-1.6-vicuna checkpoints use, with no <image> or <pad> token (llava-hf checkpoints add <image>=32000 and
<pad>=32001). `--load-format dummy` presets with a 32000-token LLaMA vocabulary use it when no tokenizer is
given, and the tests and benchmarks build their tiny checkpoints' tokenizers from it. Its README says where it
comes from.
"""

from pathlib import Path

LLAMA_TOKENIZER_DIR = Path(__file__).resolve().parent / "llama"
