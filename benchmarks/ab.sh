#!/bin/bash
# A/B of branches on one GPU host: each branch runs from its own copy of atlas/, benchmarks/ and
# tests/, the working tree is "main". Copies travel to the GPU machine in a git-ignored folder.
#
#   here:        bash benchmarks/ab.sh prepare attempt/x attempt/y   # -> .carry/x, .carry/y
#   GPU machine: bash benchmarks/ab.sh kernels x y   # scan kernels' errors and ms (scan_kernels.py) -> $OUT/scan_<name>.json
#                bash benchmarks/ab.sh conv x y      # conv kernels' errors and ms (conv_kernels.py) -> $OUT/conv_<name>.json
#                bash benchmarks/ab.sh model x y     # the 300M step (atlas bench --sections model) -> $OUT/model_<name>.json
#                bash benchmarks/ab.sh decode x      # decoding, 1K-32K (atlas bench --sections decode) -> $OUT/decode_<name>.json
#                bash benchmarks/ab.sh scaling x     # the layer at B*T = 32K, T = 2K-32K (scaling_order.py; SHAPES=BxT,... for others) -> $OUT/scaling_<name>.json
#                TESTS=1 bash benchmarks/ab.sh ...   # each copy's GPU tests first (~2 min each)
# One host for all of them: compare within a call, not across calls (H100 hosts differ by ~10-25%).
# Measure a branch in the session that writes it: only main is sure to reach the next checkout.
set -u
what=${1:?usage: bash benchmarks/ab.sh prepare|kernels|conv|model|decode|scaling NAME...}
shift
DIR=${AB_DIR:-.carry}
if [ "$what" = prepare ]; then
  for b in "$@"; do
    n=${b#attempt/}
    rm -rf "$DIR/$n" && mkdir -p "$DIR/$n" && git archive "$b" atlas benchmarks tests | tar -x -C "$DIR/$n" && echo "$DIR/$n <- $b ($(git rev-parse --short "$b"))"
  done
  exit 0
fi
: "${OUT:?set OUT to the folder for results (the device tool sets it)}"
for n in main "$@"; do
  d=$PWD; [ "$n" = main ] || d=$PWD/$DIR/$n
  if [ -n "${TESTS:-}" ] && [ "$n" != main ]; then
    (cd "$d" && PYTHONPATH=$d ATLAS_TRITON_TUNE=0 timeout 300 python3 -m pytest -q -x tests/test_triton_scan.py tests/test_conv.py 2>&1 | tail -1 | sed "s/^/$n tests: /")
  fi
  case $what in
    kernels|conv) k=scan; [ "$what" = conv ] && k=conv  # benchmarks/scan_kernels.py or conv_kernels.py
           PYTHONPATH=$d timeout 150 python3 "benchmarks/${k}_kernels.py" --name "$n" --out "$OUT/${k}_$n.json" 2>&1 | grep -v -i warn | tail -1 ;;
    model|decode) (cd "$d" && PYTHONPATH=$d timeout 220 python3 -m atlas.cli bench --sections "$what" --out "$OUT/${what}_$n.json" > "$OUT/log_${what}_$n.txt" 2>&1)
           echo "$n: $(grep -E '^300M|^decode \(' "$OUT/log_${what}_$n.txt" | tail -1)" ;;
    scaling) (cd "$d" && PYTHONPATH=$d timeout 280 python3 benchmarks/scaling_order.py --out "$OUT/scaling_$n.json" \
           --shapes "${SHAPES:-16x2048,8x4096,4x8192,2x16384,1x32768}" 2>&1 | grep -v -i warn | sed "s/^/$n: /") ;;
    *) echo "unknown: $what (prepare, kernels, conv, model, decode or scaling)" >&2; exit 2 ;;
  esac
done
