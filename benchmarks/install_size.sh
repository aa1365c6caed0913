#!/usr/bin/env bash
# The runtime-only install against the full one (issue 13), as a user gets them: from the
# built wheel (not -e), each in a fresh venv. Prints each venv's size (du -sh) and torch
# version, then makes an INT8 bundle with the export extra on the default (shipped)
# calibration photos and runs it in the core venv: info, check --golden, predict, bench,
# and export, which must exit 2 naming the extra.
#
#   benchmarks/install_size.sh                        # torch from the index
#   TORCH=torch==2.13.0 benchmarks/install_size.sh     # pre-install a CPU-only torch first
#
# Needs the package index (or its local mirror) for the dependencies. KEEP=1 keeps the venvs.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
W=$(mktemp -d)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$W"' EXIT
echo "work dir $W"

# Build from a copy, so the checkout gets no build/ or egg-info.
mkdir "$W/src"
cp "$REPO/pyproject.toml" "$REPO/README.md" "$W/src/"
(cd "$REPO" && tar --exclude=__pycache__ -cf - vit_deploy) | tar -xf - -C "$W/src"
"$PY" -m pip wheel -q --no-deps -w "$W/dist" "$W/src"
WHL=$(ls "$W"/dist/vit_deploy-*.whl)
echo "wheel $(basename "$WHL") $(du -h "$WHL" | cut -f1)"

rows=()
make_venv() {  # name, pip install arguments...
  local name=$1; shift
  "$PY" -m venv "$W/$name"
  "$W/$name/bin/pip" install -q "$@" >"$W/$name.pip.log" 2>&1 || { cat "$W/$name.pip.log"; exit 1; }
  local size torch
  size=$(du -sh "$W/$name" | cut -f1)
  torch=$("$W/$name/bin/pip" list 2>/dev/null | awk 'tolower($1)=="torch" {print $2}')
  rows+=("| $name | \`pip install ${*//$W\/dist\//}\` | $size | ${torch:-none} |")
  echo "$name: $size, torch ${torch:-none}"
}

"$PY" -m venv "$W/empty"
rows+=("| empty | \`python3 -m venv\` | $(du -sh "$W/empty" | cut -f1) | none |")
make_venv core "$WHL"
"$W/core/bin/pip" list 2>/dev/null
make_venv core-openvino "$WHL[openvino]"
# shellcheck disable=SC2086
make_venv export ${TORCH:-} "$WHL[export]"

echo; echo "== export extra, from the wheel, default calibration photos"
mkdir "$W/run"
cd "$W/run"
t0=$(date +%s.%N)
"$W/export/bin/vit-deploy" export --model vit-ti16 --target onnxruntime --precision int8
echo "export wall $(echo "$(date +%s.%N) - $t0" | bc) s"
grep -o '"calibration_dir": "[^"]*"' models/vit-ti16/manifest.json
"$W/export/bin/vit-deploy" check models/vit-ti16 --save-golden golden.npz --max-images 8 >/dev/null

echo; echo "== core venv (no torch) on that bundle, copied to another directory"
mkdir "$W/box" && cp -r models/vit-ti16 golden.npz "$W/box/" && cd "$W/box"
photo=$(ls "$W"/core/lib/python3*/site-packages/vit_deploy/data/calibration/chelsea_full.jpg)
for args in "info vit-ti16" "check vit-ti16 --golden golden.npz" "predict vit-ti16 $photo --top 3" "bench vit-ti16 --iters 20"; do
  echo "\$ vit-deploy $args"
  # shellcheck disable=SC2086
  "$W/core/bin/vit-deploy" $args
done
echo "\$ vit-deploy export --model vit-ti16"
set +e
"$W/core/bin/vit-deploy" export --model vit-ti16
code=$?
set -e
echo "exit $code"
[ "$code" = 2 ]

echo; echo "| install | command | venv size (du -sh) | torch |"; echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
