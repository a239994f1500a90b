# The RPC round-trip benchmark on the board's arm64 Linux (two processes, as splitvirt and its
# backend run there).
chmod +x /roundtrip
/roundtrip
