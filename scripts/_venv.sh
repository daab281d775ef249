# Sourced by scripts/serve and scripts/test: make sure ./.venv exists and holds the
# project (editable) with the extras named in $1 (empty for none). Debian's system Python
# refuses `pip install` outside a venv (PEP 668), and its venv module lives in the
# separate python3-venv package, installed here when missing (as root, as on CI).
venv_extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  if ! python3 -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing: python3-venv"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    else
      echo "python3 cannot make a venv: install python3-venv (sudo apt-get install python3-venv)" >&2
      exit 1
    fi
    python3 -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${venv_extras:+[$venv_extras]}"
