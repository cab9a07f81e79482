#!/bin/sh
# ezssh-host-cert: get host certificates for this host's own host keys from the ezssh service.
# Installed by the ezssh host setup script; POSIX sh; needs ssh-keygen and curl or wget.
#
#   ezssh-host-cert [--root DIR] keys SSHD_T_OUTPUT          list the host keys to certify
#   ezssh-host-cert [--root DIR] enrol CONF TOKEN OUTDIR KEY...
#       first enrolment with a one-time token (CONF: the policy's EZSSH_API/TENANT/POLICY file): asks
#       for a challenge for the token and the keys, proves possession of each key (ssh-keygen -Y sign
#       -n ezssh-host-enrol), and writes OUTDIR/<key name>-cert.pub for each key and OUTDIR/renew_after
#   ezssh-host-cert [--root DIR] take ANSWER OUTDIR KEY...
#       the same split for certificates the service rendered into the setup script (Azure VMs)
#   ezssh-host-cert [--root DIR] renew [--force]
#       for each policies/*.hostcert whose renew-after time has come (or --force): prove possession
#       of the current host keys (ssh-keygen -Y sign -n ezssh-host-renew on a server challenge),
#       install the new certificates, check with sshd -t, and reload sshd
#
# Host keys: ed25519, ECDSA, and RSA of 3072 bits or more (what the service accepts). Every
# certificate is checked with ssh-keygen -L to be a host certificate for the key it is stored for.
set -eu
umask 022

ROOT=${EZSSH_ROOT:-}
while [ $# -gt 0 ]; do
    case $1 in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --root=*) ROOT=${1#--root=}; shift ;;
        *) break ;;
    esac
done
ROOT=${ROOT%/}
EZ=$ROOT/etc/ssh/ezssh
CERTS=$EZ/host_certs
CMD=${1:-}
[ $# -eq 0 ] || shift

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ezssh-hc.XXXXXX")
trap 'rm -rf "$TMP"' EXIT INT TERM

say() { echo "ezssh-host-cert: $*" >&2; }
die() { say "$*"; exit 1; }

# TYPE BITS of a public key file, as ssh-keygen -l sees it; fails for anything we do not certify
key_ok() {
    _l=$(ssh-keygen -l -f "$1" 2>/dev/null) || return 1
    _bits=${_l%% *}
    case $_l in
        *"(ED25519)") return 0 ;;
        *"(ECDSA)") return 0 ;;
        *"(RSA)") [ "$_bits" -ge 3072 ] ;;
        *) return 1 ;;
    esac
}

fingerprint() { # PUBFILE -> SHA256:...
    ssh-keygen -l -f "$1" | awk '{ print $2 }'
}

post() { # URL JSONFILE OUTFILE -> prints the HTTP status
    if command -v curl >/dev/null 2>&1; then
        curl -sS --max-time 60 -o "$3" -w '%{http_code}' -H 'Content-Type: application/json' \
            -H 'Accept: text/plain' --data-binary "@$2" "$1" || echo 000
    elif command -v wget >/dev/null 2>&1; then
        if wget -q -T 60 -t 1 --content-on-error -O "$3" --header='Content-Type: application/json' \
            --header='Accept: text/plain' --post-file="$2" "$1"; then echo 200; else echo 400; fi
    else
        say "neither curl nor wget is installed"
        echo 000
    fi
}

refused() { # STATUS BODYFILE
    _msg=$(sed -n 's/.*"message":"\([^"]*\)".*/\1/p' "$2" 2>/dev/null | head -n 1)
    die "the service refused (HTTP $1): ${_msg:-$(head -c 300 "$2" 2>/dev/null)}"
}

keys_json() { # KEY... -> a JSON array of public key lines
    _sep=
    printf '['
    for _k in "$@"; do
        printf '%s"%s"' "$_sep" "$(cut -d' ' -f1,2 <"$_k.pub")"
        _sep=,
    done
    printf ']'
}

# Split the service's text answer into OUTDIR/<key name>-cert.pub, matching certificates to keys by
# fingerprint; OUTDIR/renew_after gets the renewal time.
take_certs() { # ANSWER OUTDIR KEY...
    _ans=$1
    _out=$2
    shift 2
    mkdir -p "$_out"
    sed -n 's/^# renew-after \([0-9][0-9]*\)$/\1/p' "$_ans" >"$_out/renew_after"
    [ -s "$_out/renew_after" ] || die "the service's answer has no renew-after line"
    _n=0
    grep -e '-cert-v01@openssh.com ' "$_ans" | while IFS= read -r _line; do
        _n=$((_n + 1))
        printf '%s\n' "$_line" >"$TMP/c$_n-cert.pub"
        _info=$(ssh-keygen -L -f "$TMP/c$_n-cert.pub") || die "a certificate from the service does not parse"
        case $_info in
            *" host certificate"*) ;;
            *) die "the service sent a certificate that is not a host certificate" ;;
        esac
        _fp=$(printf '%s\n' "$_info" | awk '$1 == "Public" && $2 == "key:" { print $4 }')
        _found=
        for _k in "$@"; do
            if [ "$(fingerprint "$_k.pub")" = "$_fp" ]; then
                cp "$TMP/c$_n-cert.pub" "$_out/$(basename "$_k")-cert.pub"
                _found=1
            fi
        done
        if [ -z "$_found" ]; then
            [ "${EZSSH_HC_LENIENT:-0}" = 1 ] || die "the service sent a certificate for a key this host does not have ($_fp)"
            say "WARNING: skipping a certificate for a key sshd does not use ($_fp)"
        fi
    done
    [ "${EZSSH_HC_LENIENT:-0}" = 1 ] && return 0
    for _k in "$@"; do
        [ -f "$_out/$(basename "$_k")-cert.pub" ] || die "no certificate came back for $_k"
    done
}

cmd_keys() { # SSHD_T_OUTPUT: the host keys sshd uses that the service certifies
    awk 'tolower($1) == "hostkey" { print $2 }' "$1" | while IFS= read -r _k; do
        if [ -f "$_k.pub" ] && key_ok "$_k.pub"; then
            printf '%s\n' "$_k"
        fi
    done
}

# Ask for a challenge (BODY: the JSON fields before host_keys), sign it with every KEY in NAMESPACE,
# and post {BODY, challenge_id, host_keys: [{public_key, signature}]} for certificates into ANSWER.
prove() { # BODY NAMESPACE ANSWER KEY...
    _body=$1
    _ns=$2
    _ans=$3
    shift 3
    printf '{%s,"host_keys":%s}' "$_body" "$(keys_json "$@")" >"$TMP/ch.json"
    _st=$(post "$EZSSH_API/api/host-certificates/challenge" "$TMP/ch.json" "$TMP/challenge")
    [ "$_st" = 200 ] || refused "$_st" "$TMP/challenge"
    _id=$(awk '$1 == "challenge" { print $2 }' "$TMP/challenge")
    [ -n "$_id" ] || die "the service's challenge has no id"
    _sep=
    {
        printf '{%s,"challenge_id":"%s","host_keys":[' "$_body" "$_id"
        for _k in "$@"; do
            rm -f "$TMP/challenge.sig"
            ssh-keygen -q -Y sign -f "$_k" -n "$_ns" "$TMP/challenge" >/dev/null 2>&1 ||
                die "ssh-keygen could not sign the challenge with $_k"
            printf '%s{"public_key":"%s","signature":"%s"}' "$_sep" "$(cut -d' ' -f1,2 <"$_k.pub")" \
                "$(sed '1d;$d' "$TMP/challenge.sig" | tr -d '\n')"
            _sep=,
        done
        printf ']}'
    } >"$TMP/signed.json"
    _st=$(post "$EZSSH_API/api/host-certificates" "$TMP/signed.json" "$_ans")
    [ "$_st" = 200 ] || refused "$_st" "$_ans"
}

cmd_enrol() { # CONF TOKEN OUTDIR KEY...
    _conf=$1
    _token=$2
    _out=$3
    shift 3
    [ $# -gt 0 ] || die "this host has no ed25519, ECDSA or RSA (3072+ bits) host key to certify"
    EZSSH_API='' EZSSH_TENANT='' EZSSH_POLICY=''
    . "$_conf"
    case $_token in
        ezh_*) ;;
        *) die "that is not an ezssh host enrolment token (they start with ezh_)" ;;
    esac
    prove "$(printf '"tenant":"%s","policy":"%s","token":"%s"' "$EZSSH_TENANT" "$EZSSH_POLICY" "$_token")" \
        ezssh-host-enrol "$TMP/answer" "$@"
    take_certs "$TMP/answer" "$_out" "$@"
}

reload_sshd() {
    if [ -n "${EZSSH_SSHD_RELOAD:-}" ]; then
        sh -c "$EZSSH_SSHD_RELOAD"
    elif [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl reload ssh 2>/dev/null || systemctl reload sshd
    elif [ -z "$ROOT" ] && [ -f /run/sshd.pid ]; then
        kill -HUP "$(cat /run/sshd.pid)"
    else
        say "WARNING: could not reload sshd; it presents the new certificates after a reload"
    fi
}

renew_one() { # HOSTCERT_FILE FORCE
    _hcf=$1
    EZSSH_RENEW_AFTER=0 EZSSH_HOST_KEYS='' EZSSH_NAME=''
    . "$_hcf"
    if [ "$2" != 1 ] && [ "$(date +%s)" -lt "$EZSSH_RENEW_AFTER" ]; then
        return 0
    fi
    EZSSH_API='' EZSSH_TENANT='' EZSSH_POLICY=''
    . "$EZ/policies/$EZSSH_NAME.conf"
    # shellcheck disable=SC2086 - the key paths are one space-separated list
    set -- $EZSSH_HOST_KEYS
    prove "$(printf '"tenant":"%s","policy":"%s"' "$EZSSH_TENANT" "$EZSSH_POLICY")" ezssh-host-renew \
        "$TMP/answer" "$@"
    take_certs "$TMP/answer" "$TMP/new" "$@"
    for _k in "$@"; do
        _dst=$CERTS/$(basename "$_k")-cert.pub
        cp "$TMP/new/$(basename "$_k")-cert.pub" "$CERTS/.$(basename "$_k")-cert.pub.tmp"
        chmod 644 "$CERTS/.$(basename "$_k")-cert.pub.tmp"
        mv -f "$CERTS/.$(basename "$_k")-cert.pub.tmp" "$_dst"
    done
    {
        echo "# ezssh: host certificates of this host come from policy $EZSSH_POLICY; renewed by ezssh-host-cert"
        echo "EZSSH_NAME='$EZSSH_NAME'"
        echo "EZSSH_HOST_KEYS='$EZSSH_HOST_KEYS'"
        echo "EZSSH_RENEW_AFTER=$(cat "$TMP/new/renew_after")"
    } >"$_hcf.tmp"
    mv -f "$_hcf.tmp" "$_hcf"
    SSHD=${EZSSH_SSHD:-$(command -v sshd 2>/dev/null || echo /usr/sbin/sshd)}
    if ! "$SSHD" -t -f "$ROOT/etc/ssh/sshd_config" 2>"$TMP/check.err"; then
        sed 's/^/  /' "$TMP/check.err" >&2
        die "sshd -t rejects the configuration after the renewal"
    fi
    reload_sshd
    say "policy $EZSSH_POLICY: renewed the host certificates of $EZSSH_HOST_KEYS"
}

cmd_renew() {
    _force=0
    [ "${1:-}" != --force ] || _force=1
    _status=0
    for _f in "$EZ"/policies/*.hostcert; do
        [ -f "$_f" ] || continue
        if ! (renew_one "$_f" "$_force"); then
            say "could not renew the host certificates of $(basename "$_f" .hostcert); will retry"
            _status=1
        fi
    done
    return $_status
}

case $CMD in
    keys) cmd_keys "$@" ;;
    enrol) cmd_enrol "$@" ;;
    take) EZSSH_HC_LENIENT=1 take_certs "$@" ;;
    renew) cmd_renew "$@" ;;
    *) echo "usage: ezssh-host-cert [--root DIR] keys|enrol|take|renew ..." >&2; exit 2 ;;
esac
