#!/usr/bin/env bash
# The GPU measurements this tree still owes (docs/results.md, round 2026-12-04 (6)), in two
# device calls of under 600 s each. Run from the repository root with OUT set to a folder for
# the results (the device tool's $OUT) and PYTHONPATH holding this tree and diffusers:
#   OUT=/tmp/out bash benchmarks/gpu_pending.sh window   # the window conv
#   OUT=/tmp/out bash benchmarks/gpu_pending.sh tiles    # low_res_tiles
# "window": its GPU tests, its per-layer timing beside the other paths (window_ms,
# window_t3_ms) and DDPM's interactive session with and without it (one process, one dense
# baseline). "tiles": SD 512x512's and GauGAN's sessions with and without low_res_tiles. Each
# step has its own time limit, so a slow one leaves the others' results.
set -u
: "${OUT:?set OUT to a folder for the results}"
case "${1:-}" in
window)
    timeout 130 python -m pytest -q tests/kernels/test_gpu.py tests/test_api_gpu.py \
        -k "tile_conv or conv_kernels_agree" \
        >"$OUT/gpu_tests.txt" 2>&1
    tail -3 "$OUT/gpu_tests.txt"
    timeout 100 python benchmarks/conv_kernels.py --no-search --fractions 0.012 0.05 0.3 \
        --out "$OUT/conv_kernels_window.json" >"$OUT/conv_kernels.log" 2>&1
    tail -2 "$OUT/conv_kernels.log"
    timeout 320 python -m benchmarks.interactive --models ddpm-church-256 --edits 40 \
        --variant conv_kernel=window --out "$OUT/interactive_ddpm_window.json" 2>&1 |
        grep session | cut -c1-400
    ;;
tiles)
    timeout 380 python -m benchmarks.interactive --models sd15-unet-512 --edits 40 \
        --variant low_res_tiles=True --out "$OUT/interactive_sd512_low_res_tiles.json" 2>&1 |
        grep session | cut -c1-400
    timeout 180 python -m benchmarks.interactive --models gaugan-cityscapes --edits 40 \
        --variant low_res_tiles=True --out "$OUT/interactive_gaugan_low_res_tiles.json" 2>&1 |
        grep session | cut -c1-400
    ;;
*)
    echo "usage: OUT=DIR bash benchmarks/gpu_pending.sh window|tiles" >&2
    exit 2
    ;;
esac
