# Sourced by gpu-suite.sh and gpu-e2e.sh from the repo root: their settings (OUT, PY, DEVICE, from
# the environment or defaults), then on the GPU machine the carried .whl/ (made here by
# fetch-wheels.sh) installed into /tmp/site and put on PYTHONPATH/PATH. SKIP_INSTALL=1 skips the
# install (the CPU checks here).
OUT="${OUT:-benchmarks/results}"
PY="${PY:-python3}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ -z "${SKIP_INSTALL:-}" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "$(basename "$0"): installing .whl/ failed (run fetch-wheels.sh here and carry .whl)"; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
fi
