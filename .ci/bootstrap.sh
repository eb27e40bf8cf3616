#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what a
# target needs.  The environment and pip's download cache live outside the
# clone, so a rerun or a fresh clone on the same machine is fast, while a
# fresh machine still gets everything from the package index.
#   .ci/bootstrap.sh train   -> runtime + training (make demo)
#   .ci/bootstrap.sh test    -> everything the test suite uses
set -euo pipefail
target=${1:-test}
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMPIPE_VENV:-$HOME/.cache/mmpipe/venv}
python=${PYTHON:-python3}

case "$target" in
  train) extras="train,cpu,batch" ;;
  test)  extras="train,cpu,batch,triton,serve,minilm,dev" ;;
  *) echo "usage: $0 train|test" >&2; exit 2 ;;
esac

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating virtual environment in $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi

# Re-resolve dependencies only when pyproject.toml or the extras change.
stamp="$venv/.mmpipe-$target-$(cat "$repo/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing dependencies for '$target' (first run downloads several hundred MB)"
  "$venv/bin/python" -m pip install -q "$repo[$extras]"
  touch "$stamp"
fi
# The project itself, editable from this checkout (cheap, always).
log=$(mktemp)
if ! "$venv/bin/python" -m pip install -q --no-deps -e "$repo" >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"

# The Serve integration test scrapes /metrics with a real Prometheus
# (Debian's package; only its binary is used).  Best effort: without it the
# test installs it itself or skips, saying why.
if [ "$target" = test ] && ! command -v prometheus >/dev/null 2>&1 && [ ! -x /usr/bin/prometheus ] \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing prometheus (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
    >/dev/null 2>&1 || echo "bootstrap: could not install prometheus; the Serve metrics test will report it" >&2
fi

# The batch job's integration test pushes its metrics to a real Pushgateway
# (Debian's prometheus-pushgateway).  Best effort, like prometheus above.
if [ "$target" = test ] && ! command -v prometheus-pushgateway >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing prometheus-pushgateway (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus-pushgateway; } >/dev/null 2>&1 \
    || echo "bootstrap: could not install prometheus-pushgateway; the batch metrics test will report it" >&2
fi

# The Helm chart tests need the real helm (built from the Go module proxy,
# pinned) and the operators' CRDs (inside their Go modules), cached under
# ~/.cache/mmpipe; tests/integration/k8s_tools.py does the same on demand.
if [ "$target" = test ] && command -v go >/dev/null 2>&1; then
  "$venv/bin/python" - "$repo" <<'PY' || echo "bootstrap: could not fetch helm or the CRDs; the chart tests will report it" >&2
import sys
sys.path.insert(0, sys.argv[1])
from tests.integration import k8s_tools
print("bootstrap: helm at", k8s_tools.helm_binary())
print("bootstrap: CRD schemas:", len(k8s_tools.crd_schemas()))
PY
fi

# The stream tests cross-check with kcat (Debian's package, librdkafka) and
# run Apache Kafka from jars fetched by Maven (Java 17 + Maven).  Best
# effort: the Kafka fixture installs kcat itself or skips that one check.
if [ "$target" = test ] && ! command -v kcat >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing kcat (apt-get)"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kcat \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kcat; }; } \
    >/dev/null 2>&1 || echo "bootstrap: could not install kcat; the kcat cross-check will report it" >&2
fi

# The real-file decoder corpus (tests/unit/test_real_files.py) converts
# photos and speech with ImageMagick, ffmpeg and espeak-ng (Debian).  Best
# effort: without them those tests skip locally and fail under CI=true.
if [ "$target" = test ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
    && { [ ! -x /usr/bin/convert ] || ! command -v ffmpeg >/dev/null 2>&1 || ! command -v espeak-ng >/dev/null 2>&1; }; then
  echo "bootstrap: installing imagemagick, ffmpeg, espeak-ng (apt-get)"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends imagemagick ffmpeg espeak-ng \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         imagemagick ffmpeg espeak-ng; }; } >/dev/null 2>&1 \
    || echo "bootstrap: could not install imagemagick/ffmpeg/espeak-ng; the real-file decoder tests will report it" >&2
fi
