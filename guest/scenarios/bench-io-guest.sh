# Inside a benchmark VM: sequential and random I/O on /dev/vda, then TCP to the board.
/iobench seq-write /dev/vda "$IOB_MIB"
/iobench seq-read /dev/vda "$IOB_MIB"
/iobench rand-read /dev/vda "$IOB_SECONDS"
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
/iobench tcp-send 10.0.2.1 5000 "$IOB_MIB"
