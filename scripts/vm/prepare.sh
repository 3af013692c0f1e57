#!/usr/bin/env bash
# Builds the test VM's kernel and initramfs once and caches them; prints the directory that holds
# them (vmlinuz, vmlinux when it can be extracted, initramfs.gz, kernel-release). Idempotent:
# when the cache is current it only hashes the harness scripts and returns. --quiet: say nothing
# unless something fails.
#
# The kernel is Debian's (the host kernel has no ublk driver): linux-image-amd64 from
# bookworm-backports (CLDD_VM_SUITE picks another suite, e.g. trixie-backports), fetched with
# apt-get using private state inside the cache so the system's apt configuration stays untouched.
# The initramfs is busybox-static, the modules the guest needs
# (decompressed, in load order) and guest-init.sh as /init.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${CLDD_VM_CACHE:-/var/cache/cldd-vm}
suite=${CLDD_VM_SUITE:-bookworm-backports}
package=${CLDD_VM_KERNEL_PACKAGE:-linux-image-amd64}
# Modules loaded at boot; modprobe adds their dependencies and soft dependencies in order. An
# extra module may carry parameters: CLDD_VM_MODULES="brd:rd_nr=1,rd_size=1048576".
modules="9p 9pnet_virtio overlay ext4 loop ublk_drv ${CLDD_VM_MODULES:-}"

fail() { echo "vm: $*" >&2; exit 125; }
say() { [ -n "$quiet" ] || echo "vm: $*" >&2; }
quiet=""
[ "${1:-}" = --quiet ] && quiet=1
# Whatever fails without its own message still ends in one "vm: " line.
trap 'fail "preparing the VM image failed (prepare.sh line $LINENO)"' ERR

# The image is keyed by everything that goes into it, so editing the harness rebuilds it.
key=$({ cat "$here/prepare.sh" "$here/guest-init.sh"; echo "$suite $package $modules"; } \
  | sha256sum | cut -c1-16) || fail "cannot read the harness scripts in $here"
image=$cache/image-$key
if [ -f "$image/ready" ]; then
  touch "$image" 2>/dev/null || true # marks it in use, see the pruning at the end
  echo "$image"
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb modprobe depmod cpio gzip xz zstd flock; do
  command -v "$tool" >/dev/null || fail "$tool is missing (run scripts/setup.sh)"
done
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 \
  || fail "/bin/busybox is missing (busybox-static; run scripts/setup.sh)"
mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ] \
  || fail "cannot write the cache directory $cache (set CLDD_VM_CACHE, or run as root)"

# One builder at a time; a run that waited here usually finds the image ready. A build takes
# half a minute, a few with its downloads: ten minutes means the holder is stuck.
exec 9>"$cache/lock"
flock -w 600 9 || fail "waited 600 s for $cache/lock: another prepare.sh has been building the VM image there all that time"
if [ -f "$image/ready" ]; then
  echo "$image"
  exit 0
fi
say "building the VM image in $image (once; about half a minute)"

rm -rf "$cache"/build.* # left by a builder that was killed: only the lock holder builds
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- Kernel package ------------------------------------------------------------------------------

# The mirror the system already uses for Debian's main archive, read through apt itself so that
# both sources.list and deb822 .sources files count. No host name is written in this script.
debian_mirror() {
  local codename uri release label
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}") || true
  while IFS='|' read -r uri release label; do
    case "$uri" in http://*|https://*) ;; *) continue ;; esac
    # The main archive, not the security one (which has no backports).
    if [ "$release" = "$codename" ] || { [ "$label" = Debian ] && [ "${release%-updates}" = "$release" ]; }; then
      echo "${uri%/}"
      return 0
    fi
  done < <(apt-get indextargets --format '$(REPO_URI)|$(RELEASE)|$(LABEL)' 2>/dev/null | sort -u)
  return 1
}
mirror=${CLDD_VM_APT_MIRROR:-$(debian_mirror)} \
  || fail "cannot find the Debian mirror in the system's apt sources (set CLDD_VM_APT_MIRROR)"

# Per suite, so switching CLDD_VM_SUITE back and forth does not download kernels again.
apt_dir=$cache/apt/$suite
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/sources.list.d" "$apt_dir/debs"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
signed_by=""
[ -f "$keyring" ] && signed_by="[signed-by=$keyring] "
echo "deb $signed_by$mirror $suite main" > "$apt_dir/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache=$apt_dir/cache"
  # Our directories belong to root; apt's _apt download user could not write them.
  -o "APT::Sandbox::User=root"
)
# --error-on=any: otherwise a failed fetch is only a warning.
if ! apt-get "${apt_opts[@]}" -qq --error-on=any update >"$work/apt.log" 2>&1; then
  # Offline: the lists of an earlier build still resolve to the package kept in debs/.
  ls "$apt_dir/lists/"*Packages* >/dev/null 2>&1 \
    || fail "apt-get update of $suite failed: $(tail -n 3 "$work/apt.log" | tr '\n' ' ')"
  say "apt-get update of $suite failed; using the package lists of an earlier build"
fi

# linux-image-amd64 is a metapackage: download the concrete image it depends on.
concrete=$(apt-cache "${apt_opts[@]}" depends "$package" 2>/dev/null \
  | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
concrete=${concrete:-$package}
apt-cache "${apt_opts[@]}" show "$concrete" >/dev/null 2>&1 \
  || fail "$concrete is not in $suite at $mirror ($(tail -n 1 "$work/apt.log"))"
# Kernels from 6.16 on split the image package: the kernel itself and its modules are
# linux-binary-* and linux-modules-* packages that linux-image-* depends on.
packages=("$concrete")
while read -r part; do packages+=("$part"); done < <(apt-cache "${apt_opts[@]}" depends "$concrete" 2>/dev/null \
  | awk '$1 == "Depends:" && $2 ~ /^linux-(binary|modules)-[0-9]/ { print $2 }' | sort -u)
(cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" -qq download "${packages[@]}") >"$work/apt.log" 2>&1 \
  || fail "apt-get download ${packages[*]} failed: $(tail -n 3 "$work/apt.log" | tr '\n' ' ')"
debs=()
for p in "${packages[@]}"; do debs+=("$(ls -t "$apt_dir/debs/${p}_"*.deb | head -n 1)"); done
# Keep only the current kernel's packages (about 100 MB a kernel).
for old in "$apt_dir/debs"/*.deb; do
  [[ " ${debs[*]} " == *" $old "* ]] || rm -f "$old"
done

root=$work/kernel
mkdir -p "$root"
for deb in "${debs[@]}"; do
  dpkg-deb -x "$deb" "$root" || fail "cannot unpack $deb"
done
# Newer packages put the modules under /usr/lib/modules; depmod -b wants <root>/lib/modules.
if [ ! -d "$root/lib/modules" ] && [ -d "$root/usr/lib/modules" ]; then
  mkdir -p "$root/lib" && mv "$root/usr/lib/modules" "$root/lib/modules"
fi
kver=$(ls "$root/lib/modules" | head -n 1)
# The kernel image: /boot/vmlinuz-KVER, or /usr/lib/modules/KVER/vmlinuz in split packages.
vmlinuz=$root/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || vmlinuz=$root/lib/modules/$kver/vmlinuz
[ -n "$kver" ] && [ -f "$vmlinuz" ] || fail "no kernel found in ${debs[*]}"
# Split packages lack modules.order and modules.builtin*: depmod warns, and only a failure counts.
depmod -b "$root" "$kver" 2>"$work/depmod.log" || fail "depmod failed for $kver: $(head -n 3 "$work/depmod.log")"

# --- Initramfs -----------------------------------------------------------------------------------

initrd=$work/initrd
mkdir -p "$initrd"/{bin,dev,proc,sys,mnt,share,newroot,lib/modules}
cp /bin/busybox "$initrd/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$initrd/bin/$applet"
done
# The kernel opens /dev/console for /init before /init can mount devtmpfs.
mknod -m 600 "$initrd/dev/console" c 5 1 2>/dev/null || true

# Load order from modprobe (dependencies and soft dependencies first), without repeats.
# busybox insmod cannot read compressed modules: store them decompressed.
: > "$initrd/lib/modules/order"
for spec in $modules; do
  mod=${spec%%:*}
  params=""
  [ "$mod" = "$spec" ] || params=${spec#*:}
  modprobe -d "$root" -S "$kver" --show-depends "$mod" >"$work/deps" 2>&1 \
    || fail "module $mod not found in kernel $kver: $(head -n 1 "$work/deps")"
  while read -r verb path _; do
    [ "$verb" = insmod ] || continue # "builtin NAME": nothing to load
    name=$(basename "$path")
    name=${name%.xz}; name=${name%.zst}; name=${name%.gz}
    grep -q "^$name\( \|\$\)" "$initrd/lib/modules/order" && continue
    case "$path" in
      *.ko.xz) xz -dc "$path" ;;
      *.ko.zst) zstd -qdc "$path" ;;
      *.ko.gz) gzip -dc "$path" ;;
      *) cat "$path" ;;
    esac > "$initrd/lib/modules/$name" || fail "cannot decompress $path"
    # The parameters belong to the module asked for, not to its dependencies.
    if [ -n "$params" ] && [ "${name%.ko}" = "$mod" ]; then
      echo "$name ${params//,/ }" >> "$initrd/lib/modules/order"
    else
      echo "$name" >> "$initrd/lib/modules/order"
    fi
  done < "$work/deps"
done

install -m 755 "$here/guest-init.sh" "$initrd/init"
echo "$kver" > "$initrd/kernel-release"
(cd "$initrd" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) \
  | gzip -6 > "$work/initramfs.gz" || fail "cannot build the initramfs"

# --- Kernel image ----------------------------------------------------------------------------------

out=$work/image
mkdir -p "$out"
cp "$vmlinuz" "$out/vmlinuz"
# qemu can boot the uncompressed ELF vmlinux through its PVH entry, which skips the bzImage's
# self-decompression (over a second under TCG). Without PVH or a known compression, run.sh
# boots the bzImage.
extract_vmlinux() {
  local bz=$1 setup_sects payload_offset payload_length start
  # Split packages ship no config: without one, boot the bzImage.
  grep -q '^CONFIG_PVH=y' "$root/boot/config-$kver" 2>/dev/null || return 1
  u() { od -An -tu"$2" -j "$1" -N "$2" "$bz" | tr -d ' '; } # little-endian header field
  setup_sects=$(u $((0x1f1)) 1)
  [ "$setup_sects" != 0 ] || setup_sects=4
  payload_offset=$(u $((0x248)) 4)
  payload_length=$(u $((0x24c)) 4)
  [ -n "$payload_offset" ] && [ "$payload_length" -gt 4 ] || return 1
  start=$(( (setup_sects + 1) * 512 + payload_offset ))
  # The payload ends with its uncompressed size (4 bytes), which is not part of the stream.
  tail -c +$((start + 1)) "$bz" | head -c $((payload_length - 4)) > "$work/payload"
  case "$(od -An -tx1 -N4 "$work/payload" | tr -d ' ')" in
    28b52ffd) zstd -qdc "$work/payload" ;;
    fd377a58) xz -dc "$work/payload" ;;
    1f8b*) gzip -dc "$work/payload" ;;
    *) return 1 ;;
  esac > "$out/vmlinux" 2>/dev/null || return 1
  [ "$(head -c 4 "$out/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] # ELF
}
extract_vmlinux "$out/vmlinuz" || rm -f "$out/vmlinux"
rm -f "$work/payload"

# --- Publish -------------------------------------------------------------------------------------

mv "$work/initramfs.gz" "$out/initramfs.gz"
echo "$kver" > "$out/kernel-release"
basename "${debs[0]}" > "$out/kernel-package"
touch "$out/ready"
rm -rf "$image"
mv "$out" "$image"
# Images of other versions of these scripts (about 70 MB each): drop those unused for two days.
find "$cache" -maxdepth 1 -name 'image-*' ! -path "$image" -mtime +1 -exec rm -rf {} + 2>/dev/null || true
say "built $image (kernel $kver)"
echo "$image"
