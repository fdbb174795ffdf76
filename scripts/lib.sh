# shellcheck shell=bash
# Shared bootstrap for scripts/test and scripts/demo: a fresh Debian/Ubuntu machine with only
# python3 must be enough. Installs Debian packages with apt-get when run as root; otherwise
# names exactly what is missing. Creates .venv and installs the project when pyproject changes.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$REPO_ROOT/.venv"

say() { printf '%s\n' "$*" >&2; }

# Debian packages the test suite drives for real (later issues add redis-server,
# openssh-server, nginx, ...). Each entry is "package:command-or-file-that-proves-it".
# The policy and audit tests evaluate office hours in Asia/Tokyo: they need the zone database.
# The browser journey drives Debian's chromium (Playwright uses it; it downloads no browser).
# The LDAP tests start OpenLDAP's slapd themselves (tests/ldap_server.py: slapadd, then
# slapd on a free loopback port) and change its data with ldap-utils' ldapadd/ldapmodify.
TEST_PACKAGES=(
  "tzdata:/usr/share/zoneinfo/Asia/Tokyo"
  "chromium:chromium"
  "slapd:/usr/sbin/slapd"
  "ldap-utils:ldapmodify"
  "redis-server:/usr/bin/redis-server" # tests/redis_server.py runs its own redis-server
  "openssh-client:/usr/bin/ssh"
)

missing_packages() {
  local entry pkg probe
  for entry in "$@"; do
    pkg=${entry%%:*}
    probe=${entry#*:}
    if [[ $probe == /* ]]; then
      [[ -e $probe ]] || printf '%s\n' "$pkg"
    else
      command -v "$probe" >/dev/null 2>&1 || printf '%s\n' "$pkg"
    fi
  done
}

preseed() {
  # slapd's installer would otherwise create a dc=nodomain directory and start a system-wide
  # slapd on port 389 that nobody asked for; the tests start their own. "No configuration"
  # installs the programs only.
  if [[ " $* " == *" slapd "* ]] && command -v debconf-set-selections >/dev/null 2>&1; then
    echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
  fi
}

apt_install() {
  # Install Debian packages when root; otherwise say exactly which are missing and fail.
  (($# == 0)) && return 0
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian packages: $*"
    preseed "$@"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" >/dev/null
  else
    say "missing Debian packages: $*"
    say "install them with: sudo apt-get install -y $*"
    return 1
  fi
}

ensure_packages() {
  local missing
  mapfile -t missing < <(missing_packages "$@")
  apt_install "${missing[@]}"
}

find_python() {
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  say "gatewayd needs Python >= 3.11 (Debian 12: apt-get install -y python3)"
  return 1
}

make_venv() {
  local python=$1 version
  "$python" -m venv "$VENV" 2>/dev/null && return 0
  rm -rf "$VENV"
  # Debian splits venv/ensurepip out of python3 into python3-venv / python3.X-venv.
  version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  apt_install "python${version}-venv" || return 1
  "$python" -m venv "$VENV"
}

ensure_venv() {
  local python stamp want
  python=$(find_python) || return 1
  if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV"
    make_venv "$python" || return 1
  fi
  want=$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)
  stamp="$VENV/.gatewayd-installed"
  if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    say "installing gatewayd and its test dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$REPO_ROOT[test,speed]"
    printf '%s\n' "$want" >"$stamp"
  fi
}

# Graders the tests run as separate programs (sslyze pins its own cryptography/pydantic, so it
# cannot share the project's venv): each gets a small venv of its own under .venv-tools/.
ensure_tool() {
  local name=$1 requirement=$2 python dir
  dir="$REPO_ROOT/.venv-tools/$name"
  if [[ ! -x $dir/bin/$name ]]; then
    python=$(find_python) || return 1
    say "installing $requirement into $dir"
    "$python" -m venv "$dir" || return 1
    "$dir/bin/python" -m pip install -q "$requirement" || return 1
  fi
  printf '%s\n' "$dir/bin/$name"
}
