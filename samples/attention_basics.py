"""diffattn.attention on tensors: patterns, layouts, the reference, and how sparse they are.

    python samples/attention_basics.py            # CPU (reference) or GPU (Triton kernel)
"""

import torch

import diffattn

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32

# A small video: 4 latent frames of 16 x 16 tokens, with 32 text tokens first (CogVideoX-style).
layout = diffattn.TokenLayout((4, 16, 16), text_len=32, text_first=True)
q, k, v = (torch.randn(1, layout.seq_len, 4, 64, device=device, dtype=dtype) for _ in range(3))

patterns = {
    "dense": diffattn.Dense(),
    "window 3x7x7": diffattn.SlidingWindow((3, 7, 7)),
    "spatial window, stride 2": diffattn.SlidingWindow((None, 8, 8), stride=(1, 2, 2)),
    "radial": diffattn.Radial(decay=0.5, block=64),
}
dense = diffattn.attention(q, k, v, diffattn.Dense(), layout=layout)
for name, pattern in patterns.items():
    out = diffattn.attention(q, k, v, pattern, layout=layout)
    rel_l1 = ((out.float() - dense.float()).abs().sum() / dense.float().abs().sum()).item()
    print(f"{name:26} attends {pattern.attended_fraction(layout):6.1%} of pairs   rel. L1 vs dense {rel_l1:.3f}")

# The block layout the kernel visits, as text and as a picture.
blocks = diffattn.build_block_layout(diffattn.SlidingWindow((3, 7, 7)), layout.grid, 64, 64)
print(blocks)
print(blocks.render())
blocks.draw("window-layout.png")
print("wrote window-layout.png")
