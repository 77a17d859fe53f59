//! The serial console on the terminal: raw input when stdin is a terminal, and QEMU's
//! escape: Ctrl-A x quits, Ctrl-A Ctrl-A (or Ctrl-A a) sends a literal Ctrl-A.

use std::io::{self, Read, Write};
use std::sync::mpsc::Sender;
use std::time::Duration;

use crate::vm::{VmEvent, VmHandle};

const CTRL_A: u8 = 0x01;

/// Restores the terminal when dropped.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal. Output processing stays on, so
    /// vessel's own messages keep their line breaks.
    pub fn enter() -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid value to be overwritten by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: fd 0 is a terminal and `raw` a termios derived from its own settings.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Turns raw input bytes into guest input, watching for the escape sequence.
#[derive(Default)]
pub struct EscapeFilter {
    after_ctrl_a: bool,
}

/// What one input byte means.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    Guest(u8),
    Quit,
    Help,
    Nothing,
}

impl EscapeFilter {
    pub fn feed(&mut self, byte: u8) -> Input {
        if std::mem::take(&mut self.after_ctrl_a) {
            return match byte {
                b'x' | b'X' => Input::Quit,
                CTRL_A | b'a' => Input::Guest(CTRL_A),
                b'h' | b'?' => Input::Help,
                _ => Input::Nothing,
            };
        }
        if byte == CTRL_A {
            self.after_ctrl_a = true;
            return Input::Nothing;
        }
        Input::Guest(byte)
    }
}

/// Reads stdin until EOF, feeding the guest's serial port. Runs on its own thread.
pub fn forward_stdin(vm: VmHandle, events: Sender<VmEvent>) {
    let mut stdin = io::stdin().lock();
    let mut filter = EscapeFilter::default();
    let mut buf = [0u8; 256];
    let mut pending = Vec::new();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for &b in &buf[..n] {
            match filter.feed(b) {
                Input::Guest(b) => pending.push(b),
                Input::Quit => {
                    let _ = events.send(VmEvent::ConsoleQuit);
                    return;
                }
                Input::Help => {
                    let _ =
                        io::stderr().write_all(b"\r\nvessel: C-a x  quit    C-a C-a  send C-a\r\n");
                }
                Input::Nothing => {}
            }
        }
        // The UART's receive FIFO is small: hand over what fits, wait for the guest.
        while !pending.is_empty() {
            let taken = vm.console_input(&pending);
            pending.drain(..taken);
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        let got: Vec<Input> = b"a\x01x".iter().map(|b| f.feed(*b)).collect();
        assert_eq!(got, vec![Input::Guest(b'a'), Input::Nothing, Input::Quit]);
        let got: Vec<Input> = b"\x01\x01\x01zq".iter().map(|b| f.feed(*b)).collect();
        assert_eq!(
            got,
            vec![
                Input::Nothing,
                Input::Guest(CTRL_A),
                Input::Nothing,
                Input::Nothing,
                Input::Guest(b'q')
            ]
        );
    }
}
