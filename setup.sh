#!/usr/bin/env bash
# Install Atlas and its test tools into the current Python. Torch comes first, pinned, when
# none is present: an unpinned torch would pull several GB of CUDA packages on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test]"
