//! splitvirt: describe, check and (later) run arm64 Linux VMs whose devices live apart.

mod show;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use layout::{resolve, Description, Severity};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "splitvirt",
    version,
    about = "A VMM for arm64 Linux guests whose virtio devices run in another process"
)]
struct Cli {
    /// Write splitvirt's log here (appending) instead of to stderr, so that it never mixes with
    /// the guest's console; the backend processes it starts write there too. Levels come from
    /// RUST_LOG (default `info`; `debug`, `warn`, `error`, `off`).
    #[arg(long, global = true, env = LOG_FILE_ENV, value_name = "FILE")]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How the log file reaches the backend processes, which are this binary started anew.
use vmm::LOG_FILE_ENV;

#[derive(Subcommand)]
enum Cmd {
    /// Check or show a VM description (the built-in default when FILE is left out).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Generate the guest device tree of a VM description.
    Dtb {
        /// VM description (TOML); the built-in default when left out.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Write the DTB here.
        #[arg(short, long, required_unless_present = "dts")]
        output: Option<PathBuf>,
        /// Print DTS source on stdout.
        #[arg(long)]
        dts: bool,
        /// Initrd placement to put in /chosen: START,END (guest physical, END exclusive).
        #[arg(long, value_parser = parse_range)]
        initrd_range: Option<(u64, u64)>,
    },
    /// Check a guest DTB (ours or anyone's) against what a splitvirt guest needs.
    LintDtb { file: PathBuf },
    /// Read a guest console log: the boot sequence step by step, and the likely cause of the
    /// first step that is missing.
    Doctor { log: PathBuf },
    /// Boot a VM on KVM (aarch64 hosts). The console is the PL011 on stdin/stdout; Ctrl-A x quits.
    Run {
        /// VM description (TOML); the built-in default when left out.
        #[arg(long)]
        config: Option<PathBuf>,
        /// arm64 Linux Image, raw or gzip-compressed (overrides kernel.image).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initial ramdisk (overrides kernel.initrd).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line (overrides kernel.cmdline).
        #[arg(long)]
        cmdline: Option<String>,
        /// At the end, print boot timings and splitvirt's own memory (guest RAM excluded).
        #[arg(long)]
        stats: bool,
        /// When the guest resets: start it again from scratch, or end splitvirt (exit 0).
        #[arg(long, value_enum, default_value = "reboot")]
        on_reset: OnReset,
    },
    /// Attach this terminal to a VM's virtio-console socket (backend = "socket:PATH");
    /// Ctrl-] detaches.
    Console {
        socket: PathBuf,
        /// With stdin not a terminal: seconds to keep reading after stdin ends.
        #[arg(long, default_value_t = 2)]
        linger: u64,
    },
    /// The backend process: the device models of devices with placement = "backend"
    /// (docs/RPC.md). `splitvirt run` starts one itself; `--listen SOCKET` serves the VMs whose
    /// description says `[backend] connect = SOCKET`, each with a process of its own (so the
    /// backend can run as another user, or in a container of its own). Inside a device VM,
    /// `--port` serves the driver VM connected to its rpc-port.
    Backend {
        /// The setup socket `splitvirt run` passed (its pool, control region and doorbells).
        #[arg(long, required_unless_present_any = ["listen", "port"], conflicts_with_all = ["listen", "port"])]
        setup_fd: Option<i32>,
        /// In a device VM: serve the driver VM whose description is --config through the
        /// rpc-port at this PCI function (`0000:00:03.0`) or UIO device (`/dev/uio0`); one
        /// connection, then it ends (run it again for the next).
        #[arg(long, conflicts_with = "listen")]
        port: Option<String>,
        /// With --port: after its last work, look at the driver VM's queues for this many
        /// microseconds before sleeping (instead of the description's `[backend] poll_us`).
        /// A request made meanwhile needs no interrupt to wake the backend: in a device VM
        /// whose vCPU has nothing else to do, the latency of every request falls.
        #[arg(long, requires = "port", value_parser = clap::value_parser!(u32).range(..=i64::from(layout::layout::MAX_RPC_POLL_US)))]
        poll_us: Option<u32>,
        /// Wait for VMs on this Unix socket.
        #[arg(long)]
        listen: Option<PathBuf>,
        /// The VMs' description (the same file `splitvirt run` is given).
        #[arg(long)]
        config: Option<PathBuf>,
        /// With --listen: serve connections from this user id (repeatable; by default only
        /// this process's own user), as the kernel records the peer (SO_PEERCRED).
        #[arg(long = "allow-uid", value_name = "UID", requires = "listen")]
        allow_uids: Vec<u32>,
        /// With --listen: VMs served at once; connections past it are closed [default: 16].
        #[arg(long, requires = "listen")]
        max_vms: Option<usize>,
        /// With --listen: seconds a connection has to send its setup before it is closed
        /// [default: 20].
        #[arg(long, requires = "listen")]
        setup_timeout: Option<u64>,
    },
    /// Check that this host can run splitvirt VMs: /dev/kvm, an in-kernel vgic-v2, a guest
    /// that runs and exits on MMIO.
    HostCheck,
    /// Guest kernel configuration: print a role's fragment, or check a full .config.
    Kconfig {
        #[command(subcommand)]
        cmd: KconfigCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate; exit 0 when valid, 1 with every problem listed.
    Check { file: Option<PathBuf> },
    /// The resolved memory map (sorted by address), devices and interrupts.
    Show { file: Option<PathBuf> },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnReset {
    Reboot,
    Exit,
}

/// Replaces this process with a new splitvirt, same arguments; returns only on failure.
fn reexec() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let _ = args.next();
    std::process::Command::new("/proc/self/exe")
        .args(args)
        .exec()
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Driver,
    Device,
}

impl From<RoleArg> for kconfig::Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Driver => kconfig::Role::Driver,
            RoleArg::Device => kconfig::Role::Device,
        }
    }
}

#[derive(Subcommand)]
enum KconfigCmd {
    /// Print the fragment for a role (merge it onto allnoconfig, then olddefconfig).
    Fragment {
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// Check a full .config (not a fragment); exit 1 when a required option is missing.
    Check {
        #[arg(long, value_enum)]
        role: RoleArg,
        file: PathBuf,
    },
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once(',').ok_or("write START,END")?;
    let p = |x: &str| layout::size::parse_u64(x.trim()).ok_or(format!("`{x}` is not an address"));
    let (a, b) = (p(a)?, p(b)?);
    if b <= a {
        return Err(format!("END {b:#x} is not above START {a:#x}"));
    }
    Ok((a, b))
}

fn load(file: Option<&Path>) -> Result<Description> {
    Ok(match file {
        Some(f) => Description::load(f)?,
        None => Description::default_vm(),
    })
}

fn origin(file: Option<&Path>) -> String {
    file.map_or("the built-in default VM".into(), |f| {
        f.display().to_string()
    })
}

/// Leveled logging (`log` + env_logger): one line per record, written whole, to stderr or to
/// `--log-file`.
fn init_logging(cli: &Cli) -> Result<()> {
    let name = match cli.cmd {
        Cmd::Backend { .. } => "splitvirt-backend",
        _ => "splitvirt",
    };
    let mut b = env_logger::Builder::new();
    b.filter_level(log::LevelFilter::Info)
        .parse_env(env_logger::Env::default())
        .format(move |f, r| {
            use std::io::Write;
            let tag = match r.level() {
                log::Level::Info => return writeln!(f, "{name}: {}", r.args()),
                log::Level::Error => "error",
                log::Level::Warn => "warning",
                log::Level::Debug => "debug",
                log::Level::Trace => "trace",
            };
            writeln!(f, "{name}: {tag}: {}", r.args())
        });
    if let Some(path) = &cli.log_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the log file {}", path.display()))?;
        b.target(env_logger::Target::Pipe(Box::new(file)));
        // The backend processes are started from this binary with the same environment.
        std::env::set_var(LOG_FILE_ENV, path);
    }
    b.try_init()?;
    Ok(())
}

fn main() -> ExitCode {
    vmm::stats::process_start();
    // Not dumpable: a process of the same user (a backend among them) may not read this one's
    // memory through /proc/PID/mem, open its descriptors through /proc/PID/fd or ptrace it.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("splitvirt: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("splitvirt: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What clap's `requires` lets through: it counts an option that conflicts with one given as
/// present (clap-rs/clap#4520), so `--setup-fd 3 --max-vms 2` would pass unchecked.
fn check_backend_options(cmd: &Cmd) -> Result<()> {
    let Cmd::Backend {
        port,
        poll_us,
        listen,
        allow_uids,
        max_vms,
        setup_timeout,
        ..
    } = cmd
    else {
        return Ok(());
    };
    if poll_us.is_some() && port.is_none() {
        bail!(
            "--poll-us is for a backend that serves a device VM's port (--port); a backend \
             process spins as its VM's description says ([backend] poll_us)"
        );
    }
    if listen.is_none() && (!allow_uids.is_empty() || max_vms.is_some() || setup_timeout.is_some())
    {
        bail!("--allow-uid, --max-vms and --setup-timeout go with --listen SOCKET");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    check_backend_options(&cli.cmd)?;
    match cli.cmd {
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => {
            let d = load(file.as_deref())?;
            let problems = layout::check(&d);
            for p in &problems {
                eprintln!("{p}");
            }
            let errors = problems
                .iter()
                .filter(|p| p.severity == Severity::Error)
                .count();
            if errors > 0 {
                eprintln!("{}: {errors} error(s)", origin(file.as_deref()));
                return Ok(ExitCode::FAILURE);
            }
            println!("{}: valid", origin(file.as_deref()));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config {
            cmd: ConfigCmd::Show { file },
        } => {
            let r = resolve(&load(file.as_deref())?)?;
            for w in &r.warnings {
                eprintln!("{w}");
            }
            print!("{}", show::render(&r.layout));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Dtb {
            config,
            output,
            dts,
            initrd_range,
        } => {
            let r = resolve(&load(config.as_deref())?)?;
            for w in &r.warnings {
                eprintln!("{w}");
            }
            let boot = devicetree::BootInfo {
                initrd: initrd_range,
            };
            let blob = devicetree::generate(&r.layout, &boot)?;
            if let Some(out) = output {
                std::fs::write(&out, &blob)
                    .with_context(|| format!("cannot write {}", out.display()))?;
            }
            if dts {
                print!("{}", devicetree::to_dts(&devicetree::Tree::parse(&blob)?));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::LintDtb { file } => {
            let blob =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let tree =
                devicetree::Tree::parse(&blob).with_context(|| format!("{}", file.display()))?;
            let findings = devicetree::lint(&tree);
            for f in &findings {
                println!("{f}");
            }
            let errors = findings
                .iter()
                .filter(|f| f.level == devicetree::Level::Error)
                .count();
            if errors > 0 {
                eprintln!("{}: {errors} error(s)", file.display());
                return Ok(ExitCode::FAILURE);
            }
            println!("{}: no errors", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            config,
            kernel,
            initrd,
            cmdline,
            stats,
            on_reset,
        } => {
            let mut d = load(config.as_deref())?;
            if let Some(c) = cmdline {
                d.kernel.cmdline = c;
            }
            let r = resolve(&d)?;
            for w in &r.warnings {
                eprintln!("{w}");
            }
            let spec = vmm::RunSpec {
                layout: r.layout,
                kernel,
                initrd,
                stats,
                config: config.clone(),
            };
            let code = match vmm::run(&spec) {
                Ok(vmm::Exit::PowerOff) => {
                    log::info!("the guest powered off");
                    0
                }
                Ok(vmm::Exit::Quit) => {
                    log::info!("ended by Ctrl-A x");
                    0
                }
                Ok(vmm::Exit::Reset) if on_reset == OnReset::Reboot => {
                    log::info!("the guest reset; starting it again");
                    // A fresh process is a fresh machine: memory, devices and vCPUs anew.
                    let err = reexec();
                    log::error!("cannot restart: {err}");
                    1
                }
                Ok(vmm::Exit::Reset) => {
                    log::info!("the guest reset; ending (--on-reset exit)");
                    0
                }
                Err(e) => {
                    log::error!("{e}");
                    1
                }
            };
            // vCPU threads may still be inside KVM_RUN: end the process, not just main.
            std::process::exit(code)
        }
        Cmd::Backend {
            listen: Some(socket),
            config,
            allow_uids,
            max_vms,
            setup_timeout,
            ..
        } => {
            // Checked now, so that a bad description fails here rather than per VM.
            resolve(&load(config.as_deref())?)?;
            let exe = std::env::current_exe()?;
            let mut policy = vmm::backend::ListenPolicy::own_user();
            if !allow_uids.is_empty() {
                policy.allow_uids = allow_uids;
            }
            if let Some(n) = max_vms {
                policy.max_vms = n;
            }
            if let Some(s) = setup_timeout {
                policy.setup_timeout = std::time::Duration::from_secs(s);
            }
            vmm::backend::listen(&socket, &exe, config.as_deref(), &policy)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Backend {
            port: Some(port),
            config,
            poll_us,
            ..
        } => {
            let mut l = resolve(&load(config.as_deref())?)?.layout;
            if let Some(us) = poll_us {
                l.rpc_poll = layout::resolve::rpc_poll(us);
            }
            backend::device_vm::serve_port(&l, &port)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Backend {
            setup_fd, config, ..
        } => {
            let l = resolve(&load(config.as_deref())?)?.layout;
            let setup_fd = setup_fd.unwrap_or(-1);
            // SAFETY: F_GETFD only asks whether the descriptor is open.
            if setup_fd < 3 || unsafe { libc::fcntl(setup_fd, libc::F_GETFD) } < 0 {
                anyhow::bail!(
                    "--setup-fd {setup_fd}: not a descriptor splitvirt passes (`splitvirt run` \
                     starts this backend itself)"
                );
            }
            // SAFETY: the descriptor splitvirt run passed us; we take it over.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(setup_fd) };
            // The jail first: nothing of the VM has been read yet.
            let jailed = backend::serve::confine(&l)?;
            backend::serve::serve(&l, fd, jailed)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Console { socket, linger } => {
            vmm::terminal::attach(&socket, std::time::Duration::from_secs(linger))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::HostCheck => {
            let r = vmm::host_check()?;
            println!(
                "host-check: KVM API {}, vgic-v2 with {} interrupt lines, guest MMIO write of {:02x?} at {:#x}: this host can run splitvirt VMs",
                r.api_version, r.gic_irqs, r.mmio_exit.1, r.mmio_exit.0
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Doctor { log } => {
            let bytes =
                std::fs::read(&log).with_context(|| format!("cannot read {}", log.display()))?;
            let report = doctor::read(&String::from_utf8_lossy(&bytes));
            println!("boot sequence in {}:", log.display());
            print!("{report}");
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Kconfig {
            cmd: KconfigCmd::Fragment { role },
        } => {
            print!("{}", kconfig::fragment(role.into()));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kconfig {
            cmd: KconfigCmd::Check { role, file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            if !text.contains("CONFIG_") {
                bail!(
                    "{} has no CONFIG_ lines: is it a kernel .config?",
                    file.display()
                );
            }
            let findings = kconfig::check(&kconfig::DotConfig::parse(&text), role.into());
            for f in &findings {
                println!("{f}");
            }
            let errors = findings
                .iter()
                .filter(|f| f.level == kconfig::Level::Error)
                .count();
            if errors > 0 {
                eprintln!(
                    "{}: {errors} required option(s) missing or wrong",
                    file.display()
                );
                return Ok(ExitCode::FAILURE);
            }
            println!("{}: every required option is set", file.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
