# Sourced by scripts/test and scripts/quickstart: build (or reuse) .venv with the pinned versions.
#   .venv       torch 2.13.0 + the pinned versions in requirements/ci-constraints.txt
# torch comes from pip's configured index; TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu)
# picks another: on Linux, stock PyPI serves the CUDA build, which also runs on a CPU but is GBs.
# Re-running reuses the environment when the pins have not changed.
PYTHON=${PYTHON:-python3}
# No wheel cache: the environments hold what they need, and a copy of every wheel (vLLM's and its
# dependencies' are gigabytes) would only double the disk a fresh machine needs.
export PIP_NO_CACHE_DIR=1

setup_venv() {  # setup_venv DIR STAMP_INPUT... : (re)install when the pin files change
  local dir=$1; shift
  local stamp="$dir/.pins-$(cat "$@" pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    return 1
  fi
}

if ! setup_venv .venv requirements/ci-constraints.txt; then
  echo "== setting up .venv (pinned)"
  .venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
  .venv/bin/pip install -q -c requirements/ci-constraints.txt -e ".[dev]"
  touch ".venv/.pins-$(cat requirements/ci-constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
fi
