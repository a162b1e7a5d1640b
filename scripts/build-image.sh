#!/usr/bin/env bash
# Build imgdl's container image where no registry image can be pulled.
#
#   scripts/build-image.sh              # → localhost/imgdl:dev
#
# 1. Installs podman, runc and debootstrap from the distribution if they are missing.
# 2. Makes a Debian base image from the distribution's packages (debootstrap minbase +
#    python3, python3-venv, ca-certificates, security updates, and this machine's extra
#    CA certificates from /usr/local/share/ca-certificates, so that builds trust a
#    TLS-intercepting proxy), tagged localhost/imgdl-base:bookworm. It is built once
#    and reused while its recipe and those certificates stay the same.
# 3. Builds the Dockerfile on it: podman build --build-arg BASE_IMAGE=<that base>.
#
# Progress goes to stderr; the last line on stdout is the ID of the image built.
#
# Environment:
#   IMGDL_IMAGE           tag of the image built            [localhost/imgdl:dev]
#   IMGDL_BASE_IMAGE      base image; one not under localhost/imgdl-base is used as
#                         it is (e.g. python:3.11-slim where a registry is reachable)
#                                                           [localhost/imgdl-base:bookworm]
#   IMGDL_REBUILD_BASE=1  build the base again (e.g. to take new security updates)
#   IMGDL_EXTRA_CA=FILE   a PEM file given to the build as the secret extra_ca, for pip
#                         behind a TLS-intercepting proxy with a base that lacks its CA
#   IMGDL_BUILD_ARGS      more arguments for podman build, e.g. "--build-arg EXTRAS=decode"
#   DEBIAN_MIRROR         [http://deb.debian.org/debian]
#
# Exit codes: 0 built; 3 this machine cannot build containers (the reason on stderr);
# anything else: the build failed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMGDL_IMAGE:-localhost/imgdl:dev}
BASE=${IMGDL_BASE_IMAGE:-localhost/imgdl-base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# Raise when the base's recipe below changes: a cached base of another recipe is rebuilt.
BASE_RECIPE=1
HOST_CAS=/usr/local/share/ca-certificates

say() { printf 'build-image: %s\n' "$*" >&2; }
cannot() { say "cannot build here: $*"; exit 3; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

[ "$(uname -s)" = Linux ] || cannot "not Linux"
[ "$(id -u)" = 0 ] || cannot "podman runs here as root with its default storage; this is uid $(id -u)"

# podman 4.3 from Debian: crun fails on this kind of machine's hybrid cgroup layout, so
# runc; and podman's default rlimits exceed the sandbox's hard limits, so ours.
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
PODMAN_RUN_FLAGS=(--runtime runc --ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)

# -- tools --------------------------------------------------------------------------
need=()
command -v podman > /dev/null || need+=(podman)
command -v runc > /dev/null || need+=(runc)
case $BASE in localhost/imgdl-base:*) command -v debootstrap > /dev/null || need+=(debootstrap) ;; esac
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get > /dev/null || cannot "${need[*]} missing and no apt-get to install them"
    say "installing ${need[*]}"
    started=$(now)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q > /dev/null
    apt-get install -y -q "${need[@]}" > /dev/null
    say "installed in $(took "$started")"
fi

# One build at a time on this machine (two test runs, say): they share podman's storage.
lockdir=/run/lock
[ -d "$lockdir" ] || lockdir=/tmp
exec 9> "$lockdir/imgdl-build-image.lock"
flock --timeout 1200 9 || { say "another build held the lock for 20 minutes"; exit 1; }

# -- the base image -------------------------------------------------------------------
base_key() {
    {
        echo "recipe $BASE_RECIPE $SUITE $MIRROR $SECURITY_MIRROR"
        find "$HOST_CAS" -name '*.crt' -type f -print0 2> /dev/null | sort -z | xargs -0r cat
    } | sha256sum | cut -c1-16
}

build_base() {
    local key=$1 work rootfs started
    started=$(now)
    work=$(mktemp -d /var/tmp/imgdl-base.XXXXXX)
    rootfs=$work/rootfs
    # shellcheck disable=SC2064  # expand now: the trap must remove this very folder
    trap "umount '$rootfs/proc' 2> /dev/null || true; rm -rf '$work'" EXIT
    say "base: debootstrap $SUITE (minbase + python3) from $MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR" > "$work/debootstrap.log" 2>&1 || {
        tail -20 "$work/debootstrap.log" >&2
        return 1
    }
    cat > "$rootfs/etc/apt/sources.list" << EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    # As Debian's own slim images: no docs, man pages or translations in later installs.
    cat > "$rootfs/etc/dpkg/dpkg.cfg.d/imgdl-slim" << 'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    say "base: security updates"
    mount -t proc proc "$rootfs/proc"
    chroot "$rootfs" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -q' \
        > "$work/upgrade.log" 2>&1 || {
        tail -20 "$work/upgrade.log" >&2
        return 1
    }
    umount "$rootfs/proc"
    say "base: $(grep -E '^[0-9]+ upgraded' "$work/upgrade.log" || echo 'nothing to upgrade')"
    if compgen -G "$HOST_CAS/*.crt" > /dev/null; then
        say "base: trusting this machine's extra CAs: $(cd "$HOST_CAS" && echo *.crt)"
        cp "$HOST_CAS"/*.crt "$rootfs/usr/local/share/ca-certificates/"
    fi
    chroot "$rootfs" update-ca-certificates > /dev/null
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    : > "$rootfs/etc/resolv.conf"  # the runtime provides its own
    rm -f "$rootfs/etc/hostname"
    say "base: importing as $BASE"
    tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        -C "$rootfs" -c . |
        podman import \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["python3"]' \
            --change "LABEL org.imgdl.base.key=$key" \
            --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase with python3, by imgdl's scripts/build-image.sh\"" \
            - "$BASE" > /dev/null
    rm -rf "$work"
    trap - EXIT
    say "base: built in $(took "$started")"
}

case $BASE in
localhost/imgdl-base:*)
    key=$(base_key)
    have=$(podman image inspect --format '{{ index .Config.Labels "org.imgdl.base.key" }}' "$BASE" 2> /dev/null || true)
    if [ "${IMGDL_REBUILD_BASE:-}" = 1 ] || [ "$have" != "$key" ]; then
        build_base "$key"
    else
        say "base: $BASE is up to date (key $key)"
    fi
    ;;
*) say "base: $BASE, as it is" ;;
esac

# -- the image ------------------------------------------------------------------------
build_flags=("${PODMAN_RUN_FLAGS[@]}" --build-arg "BASE_IMAGE=$BASE" --tag "$IMAGE")
if [ -n "${IMGDL_EXTRA_CA:-}" ]; then
    build_flags+=(--secret "id=extra_ca,src=$IMGDL_EXTRA_CA")
fi
# shellcheck disable=SC2206  # word splitting wanted: extra arguments
[ -n "${IMGDL_BUILD_ARGS:-}" ] && build_flags+=($IMGDL_BUILD_ARGS)
old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2> /dev/null || true)
iidfile=$(mktemp)
say "image: podman build ${build_flags[*]} $REPO"
started=$(now)
# HTTP(S)_PROXY and NO_PROXY, when set, reach the build's RUN steps by podman's default.
podman build "${build_flags[@]}" --iidfile "$iidfile" --file "$REPO/Dockerfile" "$REPO" >&2
iid=$(cat "$iidfile")
iid=${iid#sha256:}
rm -f "$iidfile"
say "image: built in $(took "$started")"
if [ -n "$old" ] && [ "$old" != "$iid" ]; then
    # the previous build of this tag, unless a container or another tag still uses it
    if [ -z "$(podman image inspect --format '{{join .RepoTags ","}}' "$old" 2> /dev/null)" ]; then
        podman rmi "$old" > /dev/null 2>&1 || true
    fi
fi
size=$(podman image inspect --format '{{.Size}}' "$iid")
say "image: $IMAGE ($iid), $((size / 1000000)) MB"
echo "$iid"
