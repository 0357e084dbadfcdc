# Sourced by scripts/demo and scripts/test: make the project's virtualenv (.venv) and
# install into it; nothing is installed into the system's Python (PEP 668: Debian's
# python3 refuses pip installs anyway).
#
#   use_venv SPEC...   e.g.  use_venv -e '.[test]'
#   venv_has SPEC...   true when those SPECs are installed and up to date
#
# Sets VENV_PYTHON. The pip step is skipped when setup.py, the SPECs and the Python are
# the same as at the last successful install (a stamp file in .venv), so running the
# scripts again costs well under a second.

venv_dir=.venv

venv_say() { echo "scripts/${0##*/}: $*" >&2; }

venv_fail() {
    venv_say "$*"
    exit 1
}

# python3 -m venv needs the venv and ensurepip modules; Debian ships them in
# python3-venv, separately from python3.
venv_module_ok() { python3 -c 'import venv, ensurepip' >/dev/null 2>&1; }

make_venv() {
    command -v python3 >/dev/null 2>&1 || venv_fail "no python3 on PATH"
    if ! venv_module_ok; then
        if [ "$(id -u)" != 0 ]; then
            venv_fail "python3's venv module is missing: run 'apt-get install python3-venv' as root"
        fi
        venv_say "installing python3-venv with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        venv_module_ok || venv_fail "python3-venv is installed but 'import venv, ensurepip' still fails"
    fi
    rm -rf "$venv_dir"
    venv_say "creating the virtualenv $venv_dir"
    python3 -m venv "$venv_dir" || venv_fail "python3 -m venv $venv_dir failed"
}

venv_stamp=$venv_dir/installed

venv_hash() {
    local sum
    sum=$( { "$PWD/$venv_dir/bin/python" -V; printf '%s\n' "$@"; cat setup.py; } 2>&1 | sha256sum)
    echo "${sum%% *}"
}

venv_has() {
    [ -f "$venv_stamp" ] && "$PWD/$venv_dir/bin/python" -c 'import sys' >/dev/null 2>&1 \
        && grep -qx "$(venv_hash "$@")" "$venv_stamp"
}

use_venv() {
    VENV_PYTHON=$PWD/$venv_dir/bin/python
    # A venv whose Python went away (python3 upgraded, .venv copied) is made again.
    if ! "$VENV_PYTHON" -c 'import sys' >/dev/null 2>&1; then
        make_venv
    fi
    venv_has "$@" && return 0
    local want
    want=$(venv_hash "$@")
    venv_say "installing into $venv_dir: $*"
    # (pip's warnings about missing local index folders are noise on some machines)
    if ! "$VENV_PYTHON" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
            | { grep -v "^WARNING: Location '" || true; }; then
        venv_fail "pip install into $venv_dir failed (see above)"
    fi
    echo "$want" >>"$venv_stamp"
}
