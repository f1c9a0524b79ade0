//! The local terminal under `lodge exec --tty`: its size, and raw mode held by a guard.

use std::io::IsTerminal;

use lodge_grpc::pb::router::TerminalSize;
use rustix::termios::{tcgetattr, tcgetwinsize, tcsetattr, OptionalActions, Termios};

/// Whether stdin is a terminal (the one `--tty` puts in raw mode and measures).
pub(super) fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// The size of the terminal on stdin; `None` if it has none.
pub(super) fn size() -> Option<TerminalSize> {
    let ws = tcgetwinsize(std::io::stdin()).ok()?;
    Some(TerminalSize {
        rows: ws.ws_row.into(),
        cols: ws.ws_col.into(),
    })
}

/// The terminal on stdin in raw mode: keys reach the remote terminal as bytes (^C, ^D, ^Z
/// included, for its line discipline to act on) and output is shown as it comes, untranslated
/// (the remote terminal already turned "\n" into "\r\n"). Dropping the guard restores the
/// settings it found, on every way out: return, error, or a panic unwinding.
pub(super) struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal on stdin in raw mode.
    pub(super) fn enable() -> Result<RawMode, String> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).map_err(|e| format!("--tty: reading the terminal: {e}"))?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&stdin, OptionalActions::Drain, &raw)
            .map_err(|e| format!("--tty: setting the terminal to raw mode: {e}"))?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing better to do if the terminal is gone.
        let _ = tcsetattr(std::io::stdin(), OptionalActions::Drain, &self.saved);
    }
}
