#!/bin/sh
# ezssh-krl-update: fetch the revocation list (KRL) of every ezssh access policy this host trusts and
# combine them into the one file sshd's RevokedKeys names. Installed by the ezssh host setup script;
# run by a systemd timer or cron. POSIX sh; needs curl or wget, od, tail.
#
#   ezssh-krl-update [--root DIR] [--no-fetch] [--combine-to FILE] [--jitter]
#
# Layout (under the root prefix):
#   /etc/ssh/ezssh/policies/<tenant>_<policy>.conf   EZSSH_API, EZSSH_TENANT, EZSSH_POLICY
#   /etc/ssh/ezssh/policies/<tenant>_<policy>.token  "X-Ezssh-Host-Token: ..." (mode 0600)
#   /etc/ssh/ezssh/krl.d/<tenant>_<policy>.krl       the policy's last good KRL
#   /etc/ssh/ezssh/krl.d/<tenant>_<policy>.etag      its ETag: with curl, a fetch sends If-None-Match
#                                                    and an unchanged KRL is a 304 with no body
#   /etc/ssh/ezssh/revoked_keys                      all of them in one KRL (RevokedKeys)
#
# A KRL is a header followed by self-contained sections, so the combined KRL is a fresh empty
# header followed by the sections of each policy's KRL. A fetch that fails or does not parse
# keeps the last good KRL. sshd re-reads RevokedKeys at each login: no reload is needed. Then it runs
# ezssh-host-cert renew (host certificates past their renew-after time), where installed.
set -eu
umask 022

ROOT=${EZSSH_ROOT:-}
FETCH=1
COMBINE_TO=
JITTER=0
while [ $# -gt 0 ]; do
    case $1 in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --root=*) ROOT=${1#--root=}; shift ;;
        --no-fetch) FETCH=0; shift ;;
        --combine-to) COMBINE_TO=${2:?--combine-to needs a file}; shift 2 ;;
        --jitter) JITTER=1; shift ;;
        *) echo "ezssh-krl-update: unknown argument: $1" >&2; exit 2 ;;
    esac
done
ROOT=${ROOT%/}
EZ=$ROOT/etc/ssh/ezssh

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ezssh-krl.XXXXXX")
trap 'rm -rf "$TMP"' EXIT INT TERM

say() { echo "ezssh-krl-update: $*" >&2; }

# Is FILE an OpenSSH KRL? (magic, then a full parse by ssh-keygen where it is installed)
krl_ok() {
    [ -s "$1" ] || return 1
    [ "$(dd if="$1" bs=6 count=1 2>/dev/null)" = SSHKRL ] || return 1
    if command -v ssh-keygen >/dev/null 2>&1; then
        ssh-keygen -Q -l -f "$1" >/dev/null 2>&1 || return 1
    fi
    return 0
}

# Four big-endian bytes of FILE at OFFSET, as a number.
u32_at() {
    od -An -tu1 -j "$2" -N 4 "$1" | awk '{ for (i = 1; i <= NF; i++) v = v * 256 + $i } END { printf "%d\n", v }'
}

# Where the sections of KRL FILE start: after magic(8) version(4) krl_version(8) date(8) flags(8),
# the reserved string and the comment string.
sections_offset() {
    _rl=$(u32_at "$1" 36)
    _cl=$(u32_at "$1" $((40 + _rl)))
    echo $((44 + _rl + _cl))
}

# Write the combined KRL of every krl.d/*.krl to FILE.
combine() {
    # empty header: magic, format version 1, krl_version 0, generated_date 0, flags 0, "", ""
    printf 'SSHKRL\n\000\000\000\000\001\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000' >"$1"
    for _k in "$EZ"/krl.d/*.krl; do
        [ -f "$_k" ] || continue
        if ! krl_ok "$_k"; then
            say "skipping $_k: not a valid KRL"
            continue
        fi
        tail -c +$(($(sections_offset "$_k") + 1)) "$_k" >>"$1"
    done
    krl_ok "$1"
}

# replace_changed SRC DIR NAME: put SRC at DIR/NAME (mode 644, atomically) if it differs; true if it did.
replace_changed() {
    if cmp -s "$1" "$2/$3"; then
        return 1
    fi
    cp "$1" "$2/.$3.tmp"
    chmod 644 "$2/.$3.tmp"
    mv -f "$2/.$3.tmp" "$2/$3"
}

fetch() {
    _conf=$1
    _name=$(basename "$_conf" .conf)
    EZSSH_API='' EZSSH_TENANT='' EZSSH_POLICY=''
    . "$_conf"
    _url="$EZSSH_API/api/policies/$EZSSH_POLICY/krl?tenant=$EZSSH_TENANT"
    _hdr=$EZ/policies/$_name.token
    _etag=$EZ/krl.d/$_name.etag
    rm -f "$TMP/new" "$TMP/headers"
    if command -v curl >/dev/null 2>&1; then
        set -- -fsS --max-time 60 --retry 2 -H "@$_hdr" -D "$TMP/headers" -o "$TMP/new" -w '%{http_code}'
        if [ -s "$_etag" ] && krl_ok "$EZ/krl.d/$_name.krl"; then
            set -- "$@" -H "If-None-Match: $(cat "$_etag")"
        fi
        _code=$(curl "$@" "$_url") || return 1
        if [ "$_code" = 304 ]; then
            return 0 # unchanged since our copy: keep it
        fi
    elif command -v wget >/dev/null 2>&1; then
        wget -q -T 60 -t 3 --header="$(cat "$_hdr")" -O "$TMP/new" "$_url" || return 1
    else
        say "neither curl nor wget is installed"
        return 1
    fi
    if ! krl_ok "$TMP/new"; then
        say "policy $EZSSH_POLICY: the server's answer is not a valid KRL"
        return 1
    fi
    if replace_changed "$TMP/new" "$EZ/krl.d" "$_name.krl"; then
        say "policy $EZSSH_POLICY: new KRL"
    fi
    # the new copy's ETag (a quoted hex digest; anything else is not kept), for the next fetch
    _tag=$(sed -n 's/^[Ee][Tt][Aa][Gg]:[ 	]*//p' "$TMP/headers" 2>/dev/null | tr -d '\r' | tail -n 1)
    printf '%s' "$_tag" | grep -Eq '^"[0-9a-f]{1,64}"$' || _tag=
    printf '%s' "$_tag" >"$TMP/etag"
    replace_changed "$TMP/etag" "$EZ/krl.d" "$_name.etag" || :
}

status=0
if [ "$FETCH" = 1 ]; then
    if [ "$JITTER" = 1 ]; then
        sleep $(($(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % 120))
    fi
    for conf in "$EZ"/policies/*.conf; do
        [ -f "$conf" ] || continue
        if ! fetch "$conf"; then
            say "could not fetch the KRL of $(basename "$conf" .conf); keeping the last good one"
            status=1
        fi
    done
fi

if [ -n "$COMBINE_TO" ]; then
    combine "$COMBINE_TO"
    exit $status
fi
if ! combine "$TMP/combined"; then
    say "the combined KRL does not parse; keeping $EZ/revoked_keys"
    exit 1
fi
if replace_changed "$TMP/combined" "$EZ" revoked_keys; then
    say "updated $EZ/revoked_keys"
fi
# Host certificates renew themselves on the same timer, when their renew-after time has come.
if [ "$FETCH" = 1 ] && [ -f "$EZ/bin/ezssh-host-cert" ]; then
    EZSSH_ROOT=$ROOT sh "$EZ/bin/ezssh-host-cert" renew || status=1
fi
exit $status
