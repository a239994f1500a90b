# Nothing to do: init starts, reports, powers off (for timing boots).
value up "$(cut -d' ' -f1 /proc/uptime)"
