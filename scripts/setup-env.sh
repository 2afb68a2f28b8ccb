#!/usr/bin/env bash
# Create .venv in the repo and install dreamflow with the pinned set (constraints.txt).
# Uses this machine's local wheel folder / package indexes when `pip config` names them,
# and plain PyPI otherwise. Re-runs only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=.venv/.dreamflow-installed
want=$(cat pyproject.toml constraints.txt scripts/setup-env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/dreamflow ]; then
  exit 0
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
echo "setting up .venv with $python"
[ -x .venv/bin/python ] || "$python" -m venv .venv
if [ ! -x .venv/bin/uv ]; then
  .venv/bin/python -m pip --version >/dev/null 2>&1 || .venv/bin/python -m ensurepip --upgrade >/dev/null
  .venv/bin/python -m pip install --quiet --disable-pip-version-check uv
fi

# Local wheel folder and file:// indexes configured for pip on this machine, when they exist.
args=()
find_links=$(pip config get global.find-links 2>/dev/null || true)
for dir in $find_links; do [ -d "$dir" ] && args+=(--find-links "$dir"); done
extra=$(pip config get global.extra-index-url 2>/dev/null || true)
for url in $extra; do
  case "$url" in
    file://*) [ -d "${url#file://}" ] && args+=(--extra-index-url "$url") ;;
    *) args+=(--extra-index-url "$url") ;;
  esac
done

# --compile-bytecode: this environment may set PYTHONDONTWRITEBYTECODE, and every flow-run process
# imports torch, diffusers and prefect; without .pyc files each of them compiles them again.
.venv/bin/uv pip install --python .venv/bin/python --index-strategy unsafe-best-match --compile-bytecode \
  "${args[@]}" -c constraints.txt -e '.[test]'
echo "$want" > "$stamp"
