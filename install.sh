#!/usr/bin/env bash
# Installs g2a-bridge on a systemd machine: user, code + venv, config, data folder, units,
# the g2a-bridge wrapper; then runs "g2a-bridge doctor" and starts the units if it passes.
# Idempotent: a re-run upgrades code and restarts; config and data are never overwritten.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: sudo ./install.sh [--uninstall]
       ./install.sh --prefix DIR --no-systemd [--uninstall]

Installs g2a-bridge: code and venv in /opt/g2a-bridge, config in /etc/g2a-bridge/
(bridge.env is created with fresh credentials on first install and never overwritten),
data in /var/lib/g2a-bridge/, units g2a-bridge-web and g2a-bridge-worker, and the
wrapper /usr/local/bin/g2a-bridge. Then runs "g2a-bridge doctor" and enables and
(re)starts both units only if it passes; otherwise it says what to fill in.

Options:
  --prefix DIR   install under DIR instead of / (for tests and packaging): no root
                 needed, and nothing outside DIR is touched (no user, no chown, no systemctl)
  --no-systemd   do not create the g2a-bridge user and do not run systemctl
  --uninstall    stop and remove the units, the code and the wrapper; keep the
                 config (/etc/g2a-bridge) and the data (/var/lib/g2a-bridge)
  -h, --help     show this help

Without systemd as PID 1 (containers, some VPS images) it installs everything and prints
the two commands that run web and worker in the foreground as the service user.

Environment:
  PYTHON               the Python 3.11+ that creates the venv (default: /usr/bin/python3 when it
                       is 3.11+, else python3; the service user must be able to run it)
  G2A_BRIDGE_PIP_ARGS  extra arguments for "pip install" (e.g. --no-index --find-links DIR)

Example: sudo ./install.sh && sudo nano /etc/g2a-bridge/bridge.env && sudo ./install.sh
EOF
}

readonly SERVICE_USER=g2a-bridge
readonly UNITS=(g2a-bridge-web.service g2a-bridge-worker.service)
# What the services need from a clone, and nothing else: never .venv, data/, .git or a .env.
readonly CODE_ITEMS=(bridge requirements.txt requirements-dev.txt products.json
                     bridge.env.example systemd README.md scripts)
# Variable names in bridge.env and its example: "NAME=..." or "# NAME=..." at a line start.
readonly NAME_RE='^(?:# ?)?([A-Z][A-Z0-9_]*)='

SRC_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
readonly SRC_DIR
PYTHON=${PYTHON:-}
PREFIX=""
USE_SYSTEMD=1
ACTION=install

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$1" >&2; exit "${2:-1}"; }

parse_args() {
    while [ $# -gt 0 ]; do
        case $1 in
            --prefix) [ $# -ge 2 ] || die "--prefix needs a directory" 2; PREFIX=$2; shift 2 ;;
            --prefix=*) PREFIX=${1#*=}; shift ;;
            --no-systemd) USE_SYSTEMD=0; shift ;;
            --uninstall) ACTION=uninstall; shift ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown option: $1 (see ./install.sh --help)" 2 ;;
        esac
    done
}

set_paths() {
    if [ -n "$PREFIX" ]; then
        [ -n "${PREFIX//[A-Za-z0-9_.\/+-]/}" ] &&
            die "--prefix may only contain letters, digits and _ . / + - (it ends up in unit files)" 2
        PREFIX=$(realpath -m -- "$PREFIX")
        [ "$PREFIX" = / ] && PREFIX=""
    fi
    CODE_DIR=$PREFIX/opt/g2a-bridge
    VENV=$CODE_DIR/.venv
    ETC_DIR=$PREFIX/etc/g2a-bridge
    ENV_FILE=$ETC_DIR/bridge.env
    DATA_DIR=$PREFIX/var/lib/g2a-bridge
    UNIT_DIR=$PREFIX/etc/systemd/system
    WRAPPER=$PREFIX/usr/local/bin/g2a-bridge
}

# Decides once what this run may touch outside PREFIX, so the steps need no flags of their own.
set_modes() {
    IS_ROOT=0; [ "$(id -u)" -eq 0 ] && IS_ROOT=1
    SUDO=$(sudo_prefix)
    if [ $IS_ROOT -eq 0 ] && [ -z "$PREFIX" ]; then
        die "run it as root (${SUDO}./install.sh), or install under a folder with --prefix DIR" 2
    fi
    MANAGE_USER=0
    [ $IS_ROOT -eq 1 ] && [ $USE_SYSTEMD -eq 1 ] && [ -z "$PREFIX" ] && MANAGE_USER=1
    RUN_SYSTEMCTL=0
    NO_PID1=0  # a real install where systemd is not running: the services are run by hand
    if [ $USE_SYSTEMD -eq 1 ] && [ -z "$PREFIX" ]; then
        # A container or chroot has systemctl but no running systemd to talk to.
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
            RUN_SYSTEMCTL=1
        else
            NO_PID1=1
            [ "$ACTION" = install ] &&
                say "systemd: not running here (a container?); everything is installed, nothing is started"
        fi
    fi
    # The command to print for "run it again", as the operator would type it from here.
    if [ "$PWD" = "$SRC_DIR" ]; then RERUN="${SUDO}./install.sh"; else RERUN="${SUDO}$SRC_DIR/install.sh"; fi
}

# "sudo " for the commands we suggest, only where the operator needs it and has it: not for root who
# logged in as root (a container, a VPS without sudo), and never when sudo is not installed.
sudo_prefix() {
    command -v sudo >/dev/null || return 0
    [ "$(id -u)" -eq 0 ] && [ -z "${SUDO_USER:-}" ] && return 0
    printf 'sudo '
}

# A Python the service user can run. root's first python3 may be a pyenv build under /root, which the
# service user cannot execute and ProtectHome=yes hides: the distribution's python3 comes first.
pick_python() {
    [ -n "$PYTHON" ] && return
    if /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PYTHON=/usr/bin/python3
    else
        PYTHON=python3
    fi
}

check_python() {
    pick_python
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11+ (apt-get install python3 python3-venv)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "Python 3.11 or newer is needed, $PYTHON is $("$PYTHON" -V 2>&1)"
    say "python: $("$PYTHON" -V 2>&1) at $(command -v "$PYTHON")"
}

# Fails (one line, exit 1) unless `user` can run `python` (its real binary) the way the units will.
check_runnable_by() {
    local user=$1 real
    real=$("$2" -c 'import os, sys; print(os.path.realpath(sys.executable))')
    case $real in
        /root/* | /home/* | /run/user/*)
            die "$real is under a home folder, which the services cannot see (ProtectHome=yes); install Python 3.11+ system-wide (apt-get install python3 python3-venv) or re-run with PYTHON=/usr/bin/python3.X" ;;
    esac
    command -v runuser >/dev/null || return 0
    runuser -u "$user" -- "$real" -c 'import encodings' >/dev/null 2>&1 ||
        die "the service user $user cannot run $real (check the permissions of its folders), or re-run with PYTHON=/usr/bin/python3.X"
}

ensure_user() {
    if [ $MANAGE_USER -eq 0 ]; then
        say "user: not managed (--prefix or --no-systemd); files stay owned by $(id -un)"
        return
    fi
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        say "user: $SERVICE_USER exists"
        return
    fi
    useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home \
        --shell "$(command -v nologin || echo /bin/false)" --comment "g2a-bridge service" "$SERVICE_USER"
    say "user: $SERVICE_USER created"
}

copy_code() {
    [ "$SRC_DIR" = "$CODE_DIR" ] && die "run install.sh from a clone, not from $CODE_DIR"
    mkdir -p "$CODE_DIR"
    local item
    for item in "${CODE_ITEMS[@]}"; do
        # Replace whole items so files deleted upstream do not linger in the install.
        rm -rf "${CODE_DIR:?}/$item"
        [ -e "$SRC_DIR/$item" ] && cp -R -- "$SRC_DIR/$item" "$CODE_DIR/$item"
    done
    find "$CODE_DIR" -path "$VENV" -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
    # The service user must read the code whatever umask the clone was made with.
    chmod -R u+rwX,go+rX,go-w "$CODE_DIR"
    say "code: copied to $CODE_DIR"
}

# True when the venv runs on $PYTHON's interpreter (false once an OS upgrade removed it).
venv_matches() {
    local want have
    want=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
    have=$("$VENV/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))' \
        2>/dev/null) || return 1
    [ "$want" = "$have" ]
}

make_venv() {
    # Rebuilt rather than repaired: it holds nothing but what requirements.txt installs.
    if ! venv_matches; then
        "$PYTHON" -m venv --clear "$VENV" ||
            die "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    local extra=()
    read -r -a extra <<<"${G2A_BRIDGE_PIP_ARGS:-}"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        ${extra[@]+"${extra[@]}"} -r "$CODE_DIR/requirements.txt" ||
        die "pip install -r requirements.txt failed (see above)"
    # The code stays a plain folder (no pip install of it): a .pth file puts it on the venv's
    # path, so "python -m bridge" works from any working directory, units and wrapper alike.
    "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' |
        { read -r site && printf '%s\n' "$CODE_DIR" >"$site/g2a-bridge.pth"; }
    # ProtectSystem=strict makes /opt read-only to the services, so compile the bytecode now.
    "$VENV/bin/python" -m compileall -q "$CODE_DIR/bridge" >/dev/null || true
    say "venv: $VENV with requirements.txt installed"
}

# Prints the example with fresh credentials and this install's paths filled in.
render_env_file() {
    "$PYTHON" - "$SRC_DIR/bridge.env.example" "sqlite:///$DATA_DIR/bridge.db" "$ETC_DIR/products.json" "$NAME_RE" <<'PY'
import base64, re, secrets, sys

example, database_url, products_file, name_re = sys.argv[1:]
values = {
    "OUR_API_CLIENT_ID": secrets.token_hex(16),
    "OUR_API_CLIENT_SECRET": secrets.token_urlsafe(32),
    # Fernet.generate_key() made by hand: cryptography is not installed outside the venv.
    "BRIDGE_SECRET_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
    "DATABASE_URL": database_url,
    "PRODUCTS_FILE": products_file,
}
for line in open(example, encoding="utf-8"):
    match = re.match(name_re, line)
    if match and match.group(1) in values:
        line = f"{match.group(1)}={values.pop(match.group(1))}\n"
    sys.stdout.write(line)
for name, value in values.items():
    sys.stdout.write(f"{name}={value}\n")
PY
}

# bridge.env is root's alone (OPERATOR.md): the units get a private copy from systemd (LoadCredential=), the
# commands printed without systemd get it on standard input from root's shell. Re-applied on every run, so an
# install that made it 0640 gets 0600 back.
own_env_file() {
    [ $MANAGE_USER -eq 1 ] || return 0
    chown "root:$SERVICE_USER" "$ENV_FILE"
    chmod 0600 "$ENV_FILE"
}

# The units used to set DATABASE_URL and PRODUCTS_FILE themselves; now bridge.env is their only source, so
# a file without them gets this install's paths (read with python-dotenv, as the bridge reads it).
append_install_paths() {
    "$VENV/bin/python" - "$ENV_FILE" "sqlite:///$DATA_DIR/bridge.db" "$ETC_DIR/products.json" <<'PY'
import datetime, sys

from dotenv import dotenv_values

env_file, database_url, products_file = sys.argv[1:]
have = dotenv_values(env_file)
missing = {name: value for name, value in (("DATABASE_URL", database_url), ("PRODUCTS_FILE", products_file))
           if not (have.get(name) or "").strip()}
if missing:
    with open(env_file, "a", encoding="utf-8") as f:
        f.write(f"\n# Added by install.sh on {datetime.date.today().isoformat()}: this install's paths.\n")
        f.writelines(f"{name}={value}\n" for name, value in missing.items())
    print(" ".join(missing))
PY
}

# Appends, commented out, the settings a newer example has and the env file lacks; prints their names.
append_new_settings() {
    "$PYTHON" - "$SRC_DIR/bridge.env.example" "$ENV_FILE" "$NAME_RE" <<'PY'
import datetime, re, sys

example, env_file, name_re = sys.argv[1:]
with open(env_file, encoding="utf-8") as f:
    have = {match.group(1) for match in (re.match(name_re, line) for line in f) if match}
new = []
for line in open(example, encoding="utf-8"):
    match = re.match(name_re, line)
    if match and match.group(1) not in have:
        new.append("# " + line.lstrip("# "))
        have.add(match.group(1))
if new:
    today = datetime.date.today().isoformat()
    with open(env_file, "a", encoding="utf-8") as f:
        f.write(f"\n# Added by install.sh on {today}: new settings, commented out (see bridge.env.example).\n")
        f.writelines(new)
    print(" ".join(re.match(name_re, line).group(1) for line in new))
PY
}

write_config() {
    mkdir -p "$ETC_DIR"
    chmod 0750 "$ETC_DIR"
    [ $MANAGE_USER -eq 1 ] && chown "root:$SERVICE_USER" "$ETC_DIR"
    if [ -e "$ENV_FILE" ]; then
        local added
        added=$(append_new_settings)
        if [ -n "$added" ]; then
            say "config: $ENV_FILE kept; new settings appended, commented out: $added"
        else
            say "config: $ENV_FILE kept"
        fi
        added=$(append_install_paths)
        [ -z "$added" ] || say "config: $ENV_FILE had no $added; set to this install's paths"
    else
        # mktemp creates the file 0600 and mv puts it in place whole: the secrets are never
        # world-readable, and an interrupted run leaves no half-written bridge.env behind.
        local tmp
        tmp=$(mktemp "$ETC_DIR/.bridge.env.XXXXXX")
        render_env_file >"$tmp" || { rm -f "$tmp"; die "could not write $ENV_FILE"; }
        chmod 0600 "$tmp"
        mv -f "$tmp" "$ENV_FILE"
        say "config: $ENV_FILE created with new OUR_API_CLIENT_ID, OUR_API_CLIENT_SECRET, BRIDGE_SECRET_KEY"
    fi
    own_env_file
    if [ -e "$ETC_DIR/products.json" ]; then
        say "products: $ETC_DIR/products.json kept"
    else
        # The worker re-reads the mapping as the service user, so the group must read it.
        install -m 0640 "$SRC_DIR/products.json" "$ETC_DIR/products.json"
        [ $MANAGE_USER -eq 1 ] && chown "root:$SERVICE_USER" "$ETC_DIR/products.json"
        say "products: $ETC_DIR/products.json created from the example; edit it to map your products"
    fi
    return 0
}

make_data_dir() {
    mkdir -p "$DATA_DIR"
    chmod 0700 "$DATA_DIR"
    own_data
    say "data: $DATA_DIR (mode 0700)"
}

# Commands run as root (doctor, below) may create the SQLite file; the services must own it.
own_data() {
    [ $MANAGE_USER -eq 1 ] && chown -R "$SERVICE_USER:$SERVICE_USER" "$DATA_DIR"
    return 0
}

install_units() {
    mkdir -p "$UNIT_DIR"
    local unit
    for unit in "${UNITS[@]}"; do
        # PREFIX holds only [A-Za-z0-9_./+-] (checked above), so it is safe inside sed's s|||.
        sed -e "s|/opt/g2a-bridge|$CODE_DIR|g" \
            -e "s|/etc/g2a-bridge|$ETC_DIR|g" \
            -e "s|/var/lib/g2a-bridge|$DATA_DIR|g" \
            "$SRC_DIR/systemd/$unit" >"$UNIT_DIR/$unit"
        chmod 0644 "$UNIT_DIR/$unit"
    done
    [ $RUN_SYSTEMCTL -eq 1 ] && systemctl daemon-reload
    say "units: ${UNITS[*]} in $UNIT_DIR"
}

write_wrapper() {
    local wrapper_owner=""
    [ $MANAGE_USER -eq 1 ] && wrapper_owner=$SERVICE_USER
    mkdir -p "$(dirname -- "$WRAPPER")"
    cat >"$WRAPPER" <<EOF
#!/bin/sh
# g2a-bridge COMMAND: runs "python -m bridge COMMAND" with the installed config.
# Written by install.sh (re-running it rewrites this file).
ENV_FILE='$ENV_FILE'
# Not shell-sourced: CWS secrets contain "\$", so the app reads the file itself (python-dotenv).
# Help reads neither the config nor the data folder, so any user may ask for it.
case " \$* " in
    *" -h "* | *" --help "*) ;;
    *) if [ ! -r "\$ENV_FILE" ]; then
           hint="run it as root"
           command -v sudo >/dev/null && hint="run: sudo g2a-bridge \$*"
           echo "g2a-bridge: cannot read \$ENV_FILE (root only); \$hint" >&2
           exit 2
       fi ;;
esac
export ENV_FILE
# Like the units' UMask=0077: a database a command creates is private too.
umask 077
# Never start Python in the data folder: the service user can write it, and this may run as root. With
# -P (safe path) and / as the working directory, Python imports only from the venv and the code.
cd / || exit 2
OWNER='$wrapper_owner'
if [ -n "\$OWNER" ] && [ "\$(id -u)" = 0 ]; then
    # Run as root (only root reads the env file), then hand back to the services anything this
    # command created in the data folder (a -wal or -shm file owned by root would lock them out).
    rc=0
    "$VENV/bin/python" -P -m bridge "\$@" || rc=\$?
    chown -R "\$OWNER:\$OWNER" "$DATA_DIR"
    exit "\$rc"
fi
exec "$VENV/bin/python" -P -m bridge "\$@"
EOF
    chmod 0755 "$WRAPPER"
    say "wrapper: $WRAPPER"
}

# Names assigned an empty value in the env file: what the operator still has to fill in.
empty_settings() {
    "$PYTHON" - "$ENV_FILE" <<'PY'
import re, sys

assignments = (re.match(r"([A-Z][A-Z0-9_]*)=\s*(''|\"\")?\s*$", line) for line in open(sys.argv[1]))
print(" ".join(match.group(1) for match in assignments if match))
PY
}

check_and_start() {
    say "doctor: $WRAPPER doctor"
    local rc=0
    "$WRAPPER" doctor || rc=$?
    own_data
    if [ $rc -eq 0 ]; then
        start_units
        return
    fi
    local empty
    empty=$(empty_settings)
    say "not started: doctor failed (exit $rc), so the units were left as they were"
    [ -n "$empty" ] && note "still empty in $ENV_FILE: $empty (doctor above says which are required)"
    note "edit: $ENV_FILE"
    if [ $RUN_SYSTEMCTL -eq 1 ]; then
        note "then run: $RERUN   (or: ${SUDO}systemctl enable --now g2a-bridge-web g2a-bridge-worker)"
    else
        note "then check: $WRAPPER doctor"
        print_foreground "then start web and worker in the foreground"
    fi
}

start_units() {
    if [ $RUN_SYSTEMCTL -eq 0 ]; then
        if [ $NO_PID1 -eq 1 ]; then
            say "done: installed, not started: systemd is not running here"
        else
            say "done: installed; systemctl not run (--prefix/--no-systemd)"
        fi
        print_foreground "start web and worker in the foreground (a container's entrypoint, a supervisor, two terminals)"
        return
    fi
    systemctl enable --quiet "${UNITS[@]}"
    systemctl restart "${UNITS[@]}"
    say "done: ${UNITS[*]} enabled and (re)started"
    note "see: systemctl status g2a-bridge-web g2a-bridge-worker; journalctl -u g2a-bridge-worker -f"
}

# What each unit runs, as systemd would run it: its folder, umask, environment and command, as the service
# user. Read from the installed unit, so it can never drift from what the units do.
print_foreground() {
    note "$1:"
    local unit
    for unit in "${UNITS[@]}"; do note "  $(foreground_command "$UNIT_DIR/$unit")"; done
}

# The units use only plain KEY=value lines (no quoting, no ExecStart prefixes), so a line split will do.
# The file systemd would copy into the credentials folder (LoadCredential=NAME:FILE) comes on standard input
# instead, opened by root's shell before runuser, and ENV_FILE=- reads it there: the service user cannot open
# the 0600 file itself.
foreground_command() {
    local key value dir=/ env="" exec_start="" as_user="" stdin=""
    while IFS='=' read -r key value; do
        case $key in
            WorkingDirectory) dir=$value ;;
            LoadCredential) stdin=" <${value#*:}" ;;
            Environment) case $value in ENV_FILE=/run/credentials/*) value=ENV_FILE=- ;; esac
                         env+=" $value" ;;
            ExecStart) exec_start=$value ;;
        esac
    done <"$1"
    [ $MANAGE_USER -eq 1 ] && as_user="runuser -u $SERVICE_USER -- "
    printf 'cd %s && umask 077 && %senv%s %s%s\n' "$dir" "$as_user" "$env" "$exec_start" "$stdin"
}

# Processes started by hand (no systemd, or the commands above) outlive the uninstall: say so.
warn_running() {
    local pids=""
    if command -v pgrep >/dev/null; then
        pids=$(pgrep -f -- "$VENV/bin/python.* -m bridge (web|worker)" | tr '\n' ' ') || true
        [ -z "$pids" ] && return 0
        note "warning: g2a-bridge processes still running (PID ${pids% }) keep going until you stop them: kill ${pids% }"
    elif [ $RUN_SYSTEMCTL -eq 0 ]; then
        note "warning: web and worker started by hand keep running until you stop them"
    fi
}

uninstall() {
    if [ $RUN_SYSTEMCTL -eq 1 ]; then
        # Units that were never enabled or started are not an error here.
        systemctl disable --now --quiet "${UNITS[@]}" 2>/dev/null || true
        say "units: stopped and disabled"
    fi
    warn_running
    local unit
    # The .wants links "systemctl enable" made: without systemd to disable the units they would dangle.
    for unit in "${UNITS[@]}"; do rm -f "$UNIT_DIR/$unit" "$UNIT_DIR"/*.wants/"$unit"; done
    if [ $RUN_SYSTEMCTL -eq 1 ]; then
        systemctl daemon-reload
        systemctl reset-failed "${UNITS[@]}" 2>/dev/null || true
    fi
    say "units: removed from $UNIT_DIR, with their .wants links"
    rm -rf "${CODE_DIR:?}"
    say "code: removed $CODE_DIR"
    rm -f "$WRAPPER"
    say "wrapper: removed $WRAPPER"
    say "kept: config in $ETC_DIR and data in $DATA_DIR (delete them by hand to erase everything)"
    if [ $MANAGE_USER -eq 1 ]; then
        say "kept: user $SERVICE_USER (it owns the data; remove it with: ${SUDO}userdel $SERVICE_USER)"
    fi
}

main() {
    parse_args "$@"
    set_paths
    set_modes
    if [ "$ACTION" = uninstall ]; then
        uninstall
        return
    fi
    umask 022
    check_python
    ensure_user
    if [ $MANAGE_USER -eq 1 ]; then check_runnable_by "$SERVICE_USER" "$PYTHON"; fi
    copy_code
    make_venv
    write_config
    make_data_dir
    install_units
    write_wrapper
    check_and_start
}

# Sourced (tests call single functions), it only defines them.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
