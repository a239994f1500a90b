//! The host terminal while a guest console owns it: raw mode (bytes pass as typed, the guest
//! echoes), restored on drop; and `attach`, the client end of a console socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Raw terminal mode on fd 0 while it lasts (nothing when stdin is not a terminal).
pub struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    pub fn enter() -> Self {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a valid termios buffer.
        unsafe {
            if libc::isatty(0) != 1 {
                return RawTerminal(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawTerminal(None);
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawTerminal(Some(saved))
        }
    }
    pub fn restore(&self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the attributes read from fd 0.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Ctrl-] ends `splitvirt console`, as in telnet.
pub const DETACH: u8 = 0x1d;

#[derive(Debug, thiserror::Error)]
#[error("console socket {path}: {why}")]
pub struct AttachError {
    pub path: String,
    pub why: String,
}

/// Connects this terminal to a VM's console socket until Ctrl-], the end of stdin or the VM's
/// end. With stdin not a terminal, its bytes are sent and the console is read until the VM
/// closes it or `linger` passes after stdin ended.
pub fn attach(path: &Path, linger: std::time::Duration) -> Result<(), AttachError> {
    let conn = UnixStream::connect(path).map_err(|e| AttachError {
        path: path.display().to_string(),
        why: format!(
            "cannot connect: {e} (is the VM running with backend = \"socket:{}\"?)",
            path.display()
        ),
    })?;
    let mut from_vm = conn.try_clone().map_err(|e| AttachError {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let vm_done = done_tx.clone();
    std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from_vm.read(&mut buf) {
            if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                break;
            }
        }
        let _ = vm_done.send(());
    });
    let term = RawTerminal::enter();
    let interactive = term.0.is_some();
    std::thread::spawn(move || {
        let mut to_vm = conn;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let bytes = &buf[..n];
            let end = bytes.iter().position(|&b| interactive && b == DETACH);
            if to_vm.write_all(&bytes[..end.unwrap_or(n)]).is_err() || end.is_some() {
                let _ = done_tx.send(());
                return;
            }
        }
        if interactive {
            let _ = done_tx.send(());
        } else {
            std::thread::sleep(linger);
            let _ = done_tx.send(());
        }
    });
    let _ = done_rx.recv();
    Ok(())
}
