//! `cargo xtask demo` runs the main job; `cargo xtask test` runs every test, installing what
//! the tests need first (idempotently, cached by input).

mod arm64pkg;
mod bench;
mod board;
mod cpio;
mod cross;
mod demo;
mod devvm;
mod env;
mod fresh;
mod fuzz;
mod guest;
mod kernel;
mod kvmboot;
mod kvmconn;
mod kvmvhost;
mod qemu;
mod realboot;
mod schema;
mod test;
mod versus;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job: the default VM's memory map and device tree, then splitvirt boots it on
    /// KVM (in the board) with its disk and console in the backend process, runs a workload
    /// and prints a summary. `--shell` leaves you at a shell in the guest instead.
    Demo {
        #[arg(long)]
        shell: bool,
    },
    /// Every test: formatting, clippy, unit and integration tests, dt-validate.
    Test,
    /// `.ci/run` from a clean clone of HEAD inside a fresh Debian 12 root (debootstrap, cached
    /// as a tarball): a missing install step fails here first. `--warm` keeps the splitvirt
    /// cache of the last fresh run (kernels, schema); packages and crates come anew either way.
    Fresh {
        #[arg(long)]
        warm: bool,
    },
    /// Install the tools the tests need (apt packages, the dtschema venv and schema).
    Deps,
    /// Boot the board (emulated arm64 with KVM) with a scenario; default: the KVM smoke test.
    Board {
        #[arg(default_value = "board-smoke")]
        scenario: String,
    },
    /// Benchmarks that print a table: `boot` (timings and memory of splitvirt on KVM), `io`
    /// (virtio-blk raw and qcow2, TCP over virtio-net, in-process and backend), `jail` (the
    /// same with the backend jailed and not, alternating, after `syscall`: the cost of its
    /// system call filter alone), `rpc` (the
    /// proxy-backend round trip against eventfd and spin floors, natively and in the board),
    /// `conn` (cross-VM connector event round trip and guest-to-guest bandwidth vs memcpy),
    /// `qemu` (splitvirt against Debian's QEMU/KVM in the same board run: boot, block I/O, TCP,
    /// memory; `qemu-boot`: its boots alone; env TESTS: a subset of quiet verbose io ioq, ROUNDS, TRACE=faults), `devvm` (a driver VM's disk in-process, in the backend process and served by a
    /// device VM, side by side), `vhost` (disks in-process, in the backend process and served
    /// by qemu-storage-daemon over vhost-user, read in rotation by one guest).
    Bench {
        #[arg(value_parser = ["boot", "io", "rpc", "conn", "jail", "syscall", "qemu", "qemu-boot", "devvm", "vhost"])]
        what: String,
    },
    /// Run the cargo-fuzz targets (virtqueue, blk_request, ecam) for a while each.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Two guests on KVM in the board joined by two cross-VM connectors (one peer is killed
    /// and replaced mid-exchange).
    Kvmconn,
    /// A driver VM whose disk a device VM serves from its own, on KVM in the board.
    Kvmdevvm {
        /// Also kill the device VM under the driver VM's writes and have another take over.
        #[arg(long)]
        kill: bool,
    },
    /// vhost-user devices served by Debian's qemu-storage-daemon, on KVM in the board.
    Kvmvhost,
    /// Boot guests with splitvirt on KVM inside the board (the project's kernel and Debian's).
    Kvmboot {
        /// Only the two root-disk VMs, this many times (to chase a rare hang).
        #[arg(long)]
        root_rounds: Option<u32>,
    },
    /// Boot the guest kernel on QEMU's virt machine with our DTB (and the negative boots).
    Realboot,
    /// Build (or find in the cache) a guest kernel for a role.
    Kernel {
        #[arg(long, value_enum, default_value = "driver")]
        role: kernel::Role,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo { shell } => demo::run(shell),
        Cmd::Test => test::all(),
        Cmd::Fresh { warm } => fresh::run_ci(warm),
        Cmd::Board { scenario } if scenario == "board-smoke" => board::smoke(),
        Cmd::Board { scenario } => {
            let r = board::run(
                &scenario,
                &[],
                Vec::new(),
                std::time::Duration::from_secs(600),
            )?;
            for (name, res, detail) in r.results() {
                println!("{name}: {res} {detail}");
            }
            anyhow::ensure!(!r.timed_out, "the board timed out");
            Ok(())
        }
        Cmd::Kvmboot { root_rounds: None } => kvmboot::boot_on_kvm(),
        Cmd::Kvmboot {
            root_rounds: Some(n),
        } => kvmboot::root_rounds(n),
        Cmd::Kvmconn => kvmconn::connect_two_vms(),
        Cmd::Kvmvhost => kvmvhost::vhost_user_devices(),
        Cmd::Kvmdevvm { kill: false } => devvm::driver_served_by_a_device_vm(),
        Cmd::Kvmdevvm { kill: true } => devvm::with_the_device_vm_killed(),
        Cmd::Fuzz { seconds } => fuzz::run_all(seconds),
        Cmd::Bench { what } if what == "io" => bench::io(),
        Cmd::Bench { what } if what == "rpc" => bench::rpc(),
        Cmd::Bench { what } if what == "jail" => bench::jail(),
        Cmd::Bench { what } if what == "syscall" => bench::syscalls(),
        Cmd::Bench { what } if what == "conn" => kvmconn::bench(),
        Cmd::Bench { what } if what == "devvm" => devvm::bench(),
        Cmd::Bench { what } if what == "vhost" => bench::vhost(),
        Cmd::Bench { what } if what == "qemu" => versus::run(false),
        Cmd::Bench { what } if what == "qemu-boot" => versus::run(true),
        Cmd::Bench { .. } => bench::boot(),
        Cmd::Realboot => {
            realboot::good_boot()?;
            realboot::reusable_pool_boot()?;
            realboot::no_pci_boot()?;
            realboot::dangling_msi_boot()
        }
        Cmd::Kernel { role } => kernel::build(role).map(|_| ()),
        Cmd::Deps => {
            env::ensure_apt(test::APT_PACKAGES)?;
            schema::ensure()?;
            Ok(())
        }
    }
}
