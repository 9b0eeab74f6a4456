"""Runs the edgellm CLI with a spy on llama.cpp's model loader (tests/test_load_path.py).

At every ``llama_model_load_from_file`` it appends, as one JSON line to ``$LOAD_SPY_OUT``, the
modules loaded so far that the load path must not have loaded: gguf-py and sentencepiece's C++
extension make a CUDA build of llama.cpp crash in that very call; the others are the converter's.
"""

import json
import os
import sys

import llama_cpp
import llama_cpp.llama_cpp as low

FORBIDDEN = ("gguf", "sentencepiece", "torch", "transformers", "safetensors", "google")
_load = low.llama_model_load_from_file


def _spy(*args, **kwargs):
    found = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    with open(os.environ["LOAD_SPY_OUT"], "a", encoding="utf-8") as out:
        out.write(json.dumps(found) + "\n")
    return _load(*args, **kwargs)


low.llama_model_load_from_file = llama_cpp.llama_model_load_from_file = _spy

if __name__ == "__main__":
    from edgellm.cli import main

    sys.exit(main(sys.argv[1:]))
