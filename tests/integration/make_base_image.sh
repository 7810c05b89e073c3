#!/usr/bin/env bash
# Build a root file system tarball for `docker import`: Debian bookworm (debootstrap minbase, from
# the mirror apt uses on this machine) plus a copy of this machine's Python prefix at /opt/python,
# so that the image gets torch, deepspeed and the rest without a multi-GB download.
#
#   make_base_image.sh OUT.tar
#
# Environment: PYTHON_PREFIX (default: the prefix of `python3` on PATH), DEBIAN_MIRROR (default:
# the first deb.debian.org-style URI in /etc/apt/sources.list*), DEBIAN_SUITE (default bookworm).
# Writes OUT.tar atomically (OUT.tar.partial.PID, then rename). Needs root and debootstrap.
set -euo pipefail

out=${1:?usage: make_base_image.sh OUT.tar}
suite=${DEBIAN_SUITE:-bookworm}
# Under a virtual environment the interpreter and standard library live in the base prefix and the
# packages in the venv's site-packages: the image gets the first, with the second in place of the
# base's own site-packages.
prefix=${PYTHON_PREFIX:-$(python3 -c 'import sys; print(sys.base_prefix)')}
venv=$(python3 -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")')
site_rel=$(python3 -c 'import sys; print(f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages")')

if [[ -z "${DEBIAN_MIRROR:-}" ]]; then
    # The mirror apt already uses (deb822 "URIs:" lines or one-line "deb URI suite" entries).
    DEBIAN_MIRROR=$(
        cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
            awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}
                 /^deb / && $2 ~ /debian\/?$/ {print $2; exit}'
    ) || true
fi
mirror=${DEBIAN_MIRROR:?could not find the Debian mirror in /etc/apt/sources.list*; set DEBIAN_MIRROR}

work=$(mktemp -d "${TMPDIR:-/tmp}/msllm-base.XXXXXX")
partial=
trap 'rm -rf "$work" ${partial:+"$partial"}' EXIT
root=$work/rootfs

# Shared libraries the Python build links against (ssl, ffi, sqlite, ...), CA certificates, and g++:
# DeepSpeed on a CPU JIT-compiles its shared-memory collective op (the image build pre-compiles it).
debootstrap --variant=minbase \
    --include=ca-certificates,libssl3,libffi8,zlib1g,libsqlite3-0,libbz2-1.0,liblzma5,libreadline8,libncursesw6,libuuid1,libgomp1,g++ \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    echo "make_base_image.sh: debootstrap $suite from $mirror failed" >&2
    exit 1
}

# The Python prefix goes to /opt/python. Its bin/ (console scripts carry the old interpreter
# path in their shebang) and libpython are copied into the root file system and fixed there; the
# rest (tens of thousands of files) is streamed from the prefix straight into the tarball below.
mkdir -p "$root/opt/python/lib"
cp -a "$prefix/bin" "$root/opt/python/bin"
cp -a "$prefix"/lib/libpython* "$root/opt/python/lib/"
if [[ -n "$venv" ]]; then
    # The venv's console scripts (torchrun, deepspeed, ...); its python links stay the base's.
    for f in "$venv"/bin/*; do
        name=$(basename "$f")
        if [[ -f "$f" && ! -L "$f" && ! -e "$root/opt/python/bin/$name" ]]; then
            cp -a "$f" "$root/opt/python/bin/$name"
        fi
    done
fi
for f in "$root"/opt/python/bin/*; do
    for old_prefix in "$prefix" ${venv:+"$venv"}; do
        old_shebang="#!$old_prefix/bin/python"
        if [[ -f "$f" && ! -L "$f" ]] && head -c 200 "$f" | grep -q "^$old_shebang"; then
            sed -i "1s|^${old_shebang}[0-9.]*|#!/opt/python/bin/python3|" "$f"
        fi
    done
done
for exe in python python3 pip pip3 torchrun deepspeed; do
    if [[ -e "$root/opt/python/bin/$exe" ]]; then
        ln -sf "/opt/python/bin/$exe" "$root/usr/local/bin/$exe"
    fi
done
ln -sf /opt/python/bin/python3 "$root/usr/local/bin/python"
# The interpreter's RUNPATH names the old prefix: let the dynamic linker find libpython here.
echo /opt/python/lib >"$root/etc/ld.so.conf.d/python.conf"
chroot "$root" /sbin/ldconfig
chmod -R a+rX "$root/opt/python"
rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*

partial=$out.partial.$$ # concurrent builds of the same tarball do not mix
tar -C "$root" -cf "$partial" .
# Members: the prefix without bin/ and libpython (already in the root file system), listed below
# lib/ so that no path is in the tarball twice (docker import refuses duplicates).
members=()
for m in "$prefix"/* "$prefix"/lib/*; do
    name=${m#"$prefix"/}
    case $name in
    bin | lib | lib/libpython*) ;;
    *) members+=("./$name") ;;
    esac
done
# Without this checkout's editable msllm install, and without packages that have nothing to do
# with training (cloud CLIs, linters). Names are rewritten to ./opt/python/..., symlink targets
# (relative ones) are left alone.
excludes=(
    --exclude='__editable__*msllm*' --exclude='msllm-*.dist-info'
    --exclude='site-packages/oci' --exclude='site-packages/awscli'
    --exclude='site-packages/moto' --exclude='site-packages/cfnlint'
)
if [[ -n "$venv" ]]; then
    excludes+=(--exclude="$site_rel")
fi
tar -C "$prefix" -rf "$partial" "${excludes[@]}" \
    --transform='flags=rh;s,^\./,./opt/python/,' \
    "${members[@]}"
if [[ -n "$venv" ]]; then
    mapfile -t site_members < <(find "$venv/$site_rel" -mindepth 1 -maxdepth 1 -printf './%f\n')
    tar -C "$venv/$site_rel" -rf "$partial" "${excludes[@]}" \
        --transform="flags=rh;s,^\./,./opt/python/$site_rel/," \
        "${site_members[@]}"
fi
mv "$partial" "$out"
