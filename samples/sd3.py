"""Stable Diffusion 3 / 3.5 with diffattn: its preset via load_pipeline, then direct set_attn_processor.

    python samples/sd3.py [--model DIR_OR_HUB_ID] [--out FILE]

See samples/sparse_pipeline.py for the code (needs the checkpoint and a GPU).
"""

from sparse_pipeline import main

main("sd3")
