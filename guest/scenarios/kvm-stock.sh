# Debian's stock kernel as a splitvirt guest: it reaches init and sees its CPUs.
value cpus "$(grep -c ^processor /proc/cpuinfo)"
value kernel "$(uname -r)"
