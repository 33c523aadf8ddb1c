#!/usr/bin/env bash
# Create .venv-tools (Python tooling: test-model builder, letterbox reference).
# Usage: bash tools/setup_tools_venv.sh [VENV_DIR]   (default: .venv-tools in the repo root)
# Needs python3.11 and access to PyPI. Downloads ~5 GB (torch CUDA wheels), ~6 GB on disk.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-tools}"

python3.11 -m venv "$venv"
echo '*' > "$venv/.gitignore"   # keep the venv out of git (python < 3.13 does not do this itself)
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install --no-deps -r "$root/tools/requirements-tools.txt"

# yolov5 downloads Arial.ttf into its config dir ($YOLOV5_CONFIG_DIR or ~/.config/Ultralytics,
# /tmp/Ultralytics if ~/.config is not writable) when it is missing; give it a local font instead.
cfg="${YOLOV5_CONFIG_DIR:-$HOME/.config/Ultralytics}"
mkdir -p "$cfg"
font="$(find /usr/share/fonts -name 'DejaVuSans.ttf' 2>/dev/null | head -n1 || true)"
[ -n "$font" ] || font="$(find / -xdev -name '*.ttf' 2>/dev/null | head -n1 || true)"
if [ -n "$font" ]; then
  for f in Arial.ttf Arial.Unicode.ttf; do [ -e "$cfg/$f" ] || cp "$font" "$cfg/$f"; done
else
  echo "warning: no .ttf font found (apt-get install fonts-dejavu-core); yolov5 plotting may try to download Arial.ttf" >&2
fi

# smoke test (also makes ultralytics write its settings file, then turns off its telemetry sync)
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "$venv/bin/python" -W ignore -c '
import yolov5
from yolov5.models.yolo import Model
from yolov5.utils.loss import ComputeLoss
import onnx, onnxruntime, onnxsim, cv2, torch, torchvision
print("tools venv ok: torch", torch.__version__, "yolov5", yolov5.__version__, "onnxruntime", onnxruntime.__version__)
'
"$venv/bin/yolo" settings sync=False >/dev/null 2>&1 || true
touch "$venv/READY"
