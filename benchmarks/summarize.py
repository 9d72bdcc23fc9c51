"""Markdown table from one or more ``diffattn bench kernels`` JSON files.

    python benchmarks/summarize.py benchmarks/results/kernels-h100.json [newer.json ...]

Rows of later files replace rows of earlier ones with the same (shape, pattern, impl).
"""

import json
import sys


def main(paths):
    rows, envs = {}, []
    for path in paths:
        data = json.load(open(path))
        envs.append((path, data["environment"]))
        for r in data["results"]:
            rows[(r["shape"], r["pattern"], r["impl"].split("/")[0])] = (r, path)
    for path, env in envs:
        print(f"- `{path}`: {env.get('gpu')}, driver {env.get('driver')}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, {env['date']}")
    print()
    print("| shape | pattern | computed | diffattn ms | TFLOP/s | x SDPA | flex ms | x SDPA (flex) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    shapes = list(dict.fromkeys(k[0] for k in rows))
    for shape in shapes:
        sdpa = next(r for (s, p, i), (r, _) in rows.items() if s == shape and i == "sdpa")
        print(f"| {shape} | dense, SDPA best ({sdpa['impl'].split('/')[1]}) | 100% | {sdpa['ms']:.2f} | {sdpa['tflops']:.0f} | 1.00 | | |")
        patterns = list(dict.fromkeys(p for (s, p, i) in rows if s == shape and i == "diffattn"))
        for pattern in patterns:
            ours, _ = rows[(shape, pattern, "diffattn")]
            flex = rows.get((shape, pattern, "flex"), (None, None))[0]
            flex_cols = f"{flex['ms']:.2f} | {flex['speedup_vs_sdpa']:.2f}" if flex else "- | -"
            print(f"| {shape} | {pattern} | {ours['block_density']:.1%} | {ours['ms']:.2f} | {ours['tflops']:.0f} | "
                  f"{ours['speedup_vs_sdpa']:.2f} | {flex_cols} |")


if __name__ == "__main__":
    main(sys.argv[1:])
