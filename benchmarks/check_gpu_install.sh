#!/usr/bin/env bash
# The README's GPU install, run as written in a fresh virtual environment: it must leave exactly
# one faiss distribution, faiss-gpu-cu12, and `knnad info` must report no faiss problem. Works
# without a GPU (faiss then sees 0 GPUs). Writes results/gpu_install-<machine>.md.
#   bash benchmarks/check_gpu_install.sh [KNNAD_SOURCE]   (default: this checkout)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source_dir="${1:-$here/..}"
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
# --- the README's commands ---
pip install --quiet "$source_dir"
pip uninstall -y faiss-cpu
pip install --quiet "faiss-gpu-cu12>=1.8"
# ---
faiss_packages="$(pip list --format=freeze | grep -i '^faiss' || true)"
info="$(cd /tmp && knnad info)"
machine="cpu$(nproc)"
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    machine="$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-').lower())")"
fi
{
    echo "# GPU install check on $machine"
    echo
    echo "Fresh venv, README 'GPU install' commands; faiss distributions afterwards:"
    echo
    echo '```'
    echo "$faiss_packages"
    echo '```'
    echo
    echo '`knnad info`:'
    echo
    echo '```json'
    echo "$info"
    echo '```'
} | tee "$here/results/gpu_install-$machine.md"
python - "$info" "$faiss_packages" <<'PY'
import json, sys
info, packages = json.loads(sys.argv[1]), sys.argv[2].split()
assert len(packages) == 1 and packages[0].lower().startswith("faiss-gpu-cu12=="), packages
assert info["faiss_distribution"] == "faiss-gpu-cu12" and info["faiss_problem"] is None, info
assert info["faiss_gpu_build"] is True, info
print("OK: exactly one faiss distribution, faiss-gpu-cu12")
PY
rm -rf "$(dirname "$venv")"
