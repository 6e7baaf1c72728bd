#!/usr/bin/env python3
"""Runs llama.cpp's own convert_hf_to_gguf.py on a keel checkpoint.

keel's synthetic tokenizer (a Qwen2-style byte-level BPE learned by gen-model) is not one of the
published tokenizers the converter recognises by hash, so its pre-tokenizer is named "qwen2"
here (it splits text as Qwen2's does); nothing else of the converter is changed. The comparison
feeds token ids, so the tokenizer only has to load.

usage: convert.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf [--outtype bf16]
"""
import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    llama_dir = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(llama_dir))
    sys.path.insert(1, str(llama_dir / "gguf-py"))
    import conversion.base as base  # noqa: E402  (llama.cpp's package, from llama_dir)

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    outtype = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--outtype" else "bf16"
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py"), sys.argv[2], "--outtype", outtype,
                "--outfile", sys.argv[3]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
