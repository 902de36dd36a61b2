"""Plot the interactive benchmark's sessions (``benchmarks/interactive.py``).

    pip install matplotlib
    python -m benchmarks.plot_interactive benchmarks/results/interactive_H200.json

One panel per model: every edit's wall time in the session (sigec, coloured by whether it was
committed) beside the compiled dense model on the same input, with the p50 speedup and the card
in the title. Writes the PNG next to the JSON (or ``--out``). Never asserts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in json.loads(args.json.read_text())["results"] if "session" in r]
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        rows = r["session"]["rows"]
        idx = [row["index"] for row in rows]
        ax.plot(idx, [row.get("dense_compiled_ms") for row in rows], color="tab:gray",
                label="dense fp16, torch.compile reduce-overhead")  # fmt: skip
        for committed, colour in ((True, "tab:blue"), (False, "tab:orange")):
            pts = [(row["index"], row["edit_ms"]) for row in rows if row["commit"] == committed]
            if pts:
                ax.scatter(
                    *zip(*pts, strict=True),
                    s=10,
                    color=colour,
                    label="sigec edit, " + ("committed" if committed else "discarded"),
                )
        s = r["session"]
        ax.set_title(f"{r['model']}\np50 {s['edit_ms']['p50']:.2f} ms, "
                     f"{s.get('speedup_p50', 0):.2f}x vs compiled", fontsize=9)  # fmt: skip
        ax.set_xlabel("edit (new mask each, 0.5-5 % of the image)", fontsize=8)
        ax.set_ylabel("wall ms per edit", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"interactive sessions, {results[0]['device']}", fontsize=10)
    fig.tight_layout()
    out = args.out or args.json.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
