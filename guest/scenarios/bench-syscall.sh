# What the backend's jail costs per system call on the board's arm64 Linux
# (crates/backend/examples/syscall_cost.rs).
chmod +x /syscall_cost
/syscall_cost 50000
