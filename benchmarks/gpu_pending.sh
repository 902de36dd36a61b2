#!/usr/bin/env bash
# The GPU measurements this tree still owes (docs/results.md, round 2026-12-04 (6)), in one
# device call of under 600 s. Run from the repository root with OUT set to a folder for the
# results (the device tool's $OUT) and PYTHONPATH holding this tree and diffusers:
#   OUT=/tmp/out bash benchmarks/gpu_pending.sh
# 1. the window conv's GPU tests; 2. its per-layer timing beside the other paths (window_ms,
# window_t3_ms); 3. DDPM's interactive session with every sparse conv on the window conv;
# 4. SD 512x512's with low_res_tiles (finer tiles on the 32/16/8 maps). Each step has its own
# time limit, so a slow one leaves the others' results.
set -u
: "${OUT:?set OUT to a folder for the results}"
timeout 110 python -m pytest -q tests/kernels/test_gpu.py -k "tile_conv" >"$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
timeout 100 python benchmarks/conv_kernels.py --no-search --fractions 0.012 0.05 0.3 \
    --out "$OUT/conv_kernels_window.json" >"$OUT/conv_kernels.log" 2>&1
tail -2 "$OUT/conv_kernels.log"
timeout 185 python -m benchmarks.interactive --models ddpm-church-256 --edits 40 \
    --also conv_kernel=window --out "$OUT/interactive_ddpm_window.json" 2>&1 | grep session
timeout 185 python -m benchmarks.interactive --models sd15-unet-512 --edits 40 \
    --also low_res_tiles=True --out "$OUT/interactive_sd512_low_res_tiles.json" 2>&1 | grep session
