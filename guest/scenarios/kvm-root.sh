# Booted with root=/dev/vda2 (the seed's command line): the root file system is the disk's
# second partition (/proc/mounts calls it /dev/root; compare device numbers).
value root_dev "$(awk '$5 == "/" {print $3; exit}' /proc/self/mountinfo)"
value vda2_dev "$(cat /sys/class/block/vda2/dev 2>/dev/null)"
value root_type "$(awk '$2 == "/" && $1 != "rootfs" {print $3; exit}' /proc/mounts)"
