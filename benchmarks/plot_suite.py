"""Plot speedup against edit size from suite JSON files (``benchmarks/suite.py``).

    pip install matplotlib
    python benchmarks/plot_suite.py benchmarks/results/suite_H200.json \
        benchmarks/results/suite_H200_nchw-maps.json --out benchmarks/results/suite_H200.png

For each model (the first file that has it wins, so list the preferred run first): the edit's
speedup over dense ``torch.compile(mode="reduce-overhead")`` against the edited fraction (solid:
what ``engine.edit`` delivered, with the cost model's choice), and the sparse graph's own
replay time from the cost model's measurement (dashed: the sparse path without host overhead,
whether or not it was chosen). Never asserts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(files: list[Path]) -> list[dict]:
    seen, out = set(), []
    for f in files:
        for r in json.loads(f.read_text())["results"]:
            if "error" in r or r["model"] in seen:
                continue
            seen.add(r["model"])
            out.append(r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/suite.png"))
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load(args.files)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        v = r["variants"]["sigec-graphs"]
        fr = [row["fraction"] * 100 for row in v["rows"]]
        color = f"C{i}"
        ax.plot(fr, [row["speedup_vs_compiled"] for row in v["rows"]], "o-", color=color,
                label=f'{r["model"]} (b{r["batch"]})')  # fmt: skip
        sparse = [t["sparse"] for t in v.get("cost_model_ms", [])]
        if len(sparse) == len(fr):
            ax.plot(fr, [r["dense_compiled_ms"] / s for s in sparse], "--", color=color,
                    alpha=0.6)  # fmt: skip
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("edited area (%)")
    ax.set_ylabel("speedup vs dense fp16 torch.compile (reduce-overhead)")
    device = results[0]["device"] if results else ""
    ax.set_title(f"sigec edits, fp16, {device} (dashed: sparse graph replay alone)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
