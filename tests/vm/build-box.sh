#!/usr/bin/env bash
# Build a Vagrant libvirt box of a minimal Debian 12 and the local apt repository its VMs
# install from (they have no network beyond their host).
#
#   build-box.sh OUT MIRROR DEB
#
# OUT/flyproxy-bookworm.box  the box: metadata.json, box.img (qcow2), Vagrantfile
# OUT/repo/                  a flat apt repository: every .deb the playbook's run installs
#                            into this box (the shell provisioner's ansible-core,
#                            python3-jsonschema, make; the flyproxy package DEB's
#                            dependencies and recommends, among them the headers of the
#                            box's own kernel), with Packages and Release.
#
# The box has Debian's kernel, grub, sshd, sudo, rsync, a `vagrant` user with Vagrant's
# insecure key and DHCP on its NIC, and none of the appliance's packages: its apt source
# is the repository, served at http://192.168.121.1:8765/ (the host side of
# vagrant-libvirt's management network, inside the test's network namespace).
set -euo pipefail
out=$1 mirror=$2 deb=$3
REPO_URL=http://192.168.121.1:8765/
BOX_PACKAGES=linux-image-amd64,grub-pc-bin,grub2-common,systemd-sysv,udev,dbus,kmod,openssh-server,sudo,rsync,e2fsprogs,ifupdown,isc-dhcp-client,procps
# What the VM's provisioning installs, without Recommends as the provisioners install them:
# the project's shell provisioner's packages, python3-apt for Ansible's apt module, the
# package's dependencies, and the headers of the box's kernel (the role installs those).
GUEST_INSTALLS="ansible-core python3-jsonschema make python3-apt"
VAGRANT_KEY=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub | head -n 1)

work=$(mktemp -d /var/tmp/flyproxy-box.XXXXXX)
root=$work/root
loop=
cleanup() {
    for m in dev/pts dev proc sys; do umount "$root/$m" 2>/dev/null || true; done
    umount "$root" 2>/dev/null || true
    [ -n "$loop" ] && { partx -d "$loop" 2>/dev/null; losetup -d "$loop" 2>/dev/null; } || true
    [ -n "${part:-}" ] && rm -f "$part"
    rm -rf "$work"
}
trap cleanup EXIT

step() { echo "build-box: $* ($(date +%T))"; }

step "disk"
truncate -s 6G "$work/disk.raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$work/disk.raw"
loop=$(losetup -f --show -P "$work/disk.raw")
part=${loop}p1
# Some kernels scan the partition table only when asked, and without udev nobody may make
# the node: ask (partx), then make it from sysfs if still missing.
# A node left by an earlier loop device of that name may point elsewhere: always make it anew.
[ -e "/sys/block/${loop#/dev/}/${part#/dev/}" ] || partx -a "$loop"
IFS=: read -r major minor < "/sys/block/${loop#/dev/}/${part#/dev/}/dev"
rm -f "$part"; mknod "$part" b "$major" "$minor"
mkfs.ext4 -q -L root "$part"
uuid=$(blkid -s UUID -o value "$part")
mkdir -p "$root"
mount "$part" "$root"

step "debootstrap"
debootstrap --variant=minbase --include="$BOX_PACKAGES" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -30 "$work/debootstrap.log"; exit 1; }
mount --bind /dev "$root/dev"; mount --bind /dev/pts "$root/dev/pts"
mount -t proc proc "$root/proc"; mount -t sysfs sys "$root/sys"
in_root() { chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }

step "local apt repository"
cp /etc/resolv.conf "$root/etc/resolv.conf"
echo "deb $mirror bookworm main" > "$root/etc/apt/sources.list"
in_root apt-get update -qq
cp "$deb" "$root/tmp/flyproxy.deb"
in_root apt-get clean  # debootstrap leaves its own .debs there: the box has those
release=$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -n 1); release=${release#vmlinuz-}
in_root apt-get install -qq -d -y --no-install-recommends $GUEST_INSTALLS /tmp/flyproxy.deb \
    "linux-headers-$release" >/dev/null
rm -rf "$out.partial"; mkdir -p "$out.partial/repo"
mv "$root"/var/cache/apt/archives/*.deb "$out.partial/repo/"
(cd "$out.partial/repo" && dpkg-scanpackages -m . 2>/dev/null > Packages && gzip -k9 Packages \
    && apt-ftparchive release . > Release)
headers=$(ls "$out.partial/repo" | grep -c '^linux-headers-.*-amd64_' || true)
[ "$headers" -ge 1 ] || { echo "build-box: no linux-headers for the box's kernel in the repository" >&2; exit 1; }

step "system"
echo "deb [trusted=yes] $REPO_URL ./" > "$root/etc/apt/sources.list"
rm -rf "$root"/var/lib/apt/lists/* "$root/tmp/flyproxy.deb"
in_root apt-get clean
echo "UUID=$uuid / ext4 errors=remount-ro 0 1" > "$root/etc/fstab"
echo vagrant > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vagrant\n::1 localhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
: > "$root/etc/resolv.conf"  # no DNS: nothing the VM does needs a name
: > "$root/etc/machine-id"
printf 'auto lo\niface lo inet loopback\n\nallow-hotplug eth0\niface eth0 inet dhcp\n' \
    > "$root/etc/network/interfaces"
in_root useradd -m -s /bin/bash vagrant
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$VAGRANT_KEY" "$root/home/vagrant/.ssh/authorized_keys"
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
# vagrant-libvirt opens one SSH session per forwarded port, all at once: sshd's default
# MaxStartups (10:30:100) drops some of them.
printf 'UseDNS no\nMaxStartups 100:30:200\n' > "$root/etc/ssh/sshd_config.d/vagrant.conf"
# A throwaway test VM: dpkg need not fsync every file (the disk cache is "unsafe" too).
echo force-unsafe-io > "$root/etc/dpkg/dpkg.cfg.d/unsafe-io"
for unit in getty@tty1.service; do ln -sf /dev/null "$root/etc/systemd/system/$unit"; done

step "bootloader"
kernel=$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -n 1)
initrd=initrd.img-${kernel#vmlinuz-}
[ -e "$root/boot/$initrd" ] || { echo "build-box: no $initrd" >&2; exit 1; }
in_root grub-install --target=i386-pc --modules="part_msdos ext2" "$loop" >"$work/grub.log" 2>&1 \
    || { cat "$work/grub.log"; exit 1; }
cat > "$root/boot/grub/grub.cfg" <<EOF
set timeout=0
insmod part_msdos
insmod ext2
search --no-floppy --fs-uuid --set=root $uuid
menuentry "Debian GNU/Linux" {
    linux /boot/$kernel root=UUID=$uuid ro net.ifnames=0 quiet console=ttyS0,115200 console=tty0
    initrd /boot/$initrd
}
EOF

step "image"
for m in dev/pts dev proc sys; do umount "$root/$m"; done
umount "$root"
# What was written through the partition must be on the disk the VM boots.
mount -o ro "$part" "$root"
[ -s "$root/boot/grub/grub.cfg" ] || { echo "build-box: grub.cfg did not reach the image" >&2; exit 1; }
umount "$root"
partx -d "$loop" 2>/dev/null || true
losetup -d "$loop"; loop=
rm -f "$part"
mkdir -p "$work/box"
qemu-img convert -O qcow2 "$work/disk.raw" "$work/box/box.img"
rm -f "$work/disk.raw"
echo '{"provider": "libvirt", "format": "qcow2", "virtual_size": 6}' > "$work/box/metadata.json"
# This box's own settings (merged under the project's Vagrantfile, which stays what a user
# with KVM or VirtualBox runs): plain qemu emulation and a CPU model it can emulate.
cat > "$work/box/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "qemu"
    libvirt.cpu_mode = "custom"
    libvirt.cpu_model = "qemu64"
    libvirt.disk_bus = "virtio"
    libvirt.disk_driver :cache => "unsafe"
  end
end
EOF
tar -C "$work/box" -cf "$out.partial/flyproxy-bookworm.box" metadata.json Vagrantfile box.img
echo "$uuid $kernel" > "$out.partial/complete"
rm -rf "$out"; mv "$out.partial" "$out"
step "done: $out"
