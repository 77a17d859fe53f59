//! A guest agent that misbehaves, for the tests: it listens where `vessel-agent` does and
//! answers each connection in its own wrong way, in turn: a frame claiming 4 GiB, an
//! endless stream of output, a malformed message, silence, and an answer of the wrong
//! kind. The host must cut each off with an error, never hang or fall over.

use std::io::{Read, Write};
use std::time::Duration;

use agent::guest::{Connection, VsockListener};
use agent::protocol::{self, Message};

fn main() {
    let listener = VsockListener::bind(protocol::PORT).expect("vsock port");
    eprintln!("hostile agent: listening");
    for turn in 0u32.. {
        let Ok(mut conn) = listener.accept() else {
            continue;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
        let _ = conn.read(&mut [0u8; 4096]);
        let _ = match turn % 5 {
            0 => conn.write_all(&u32::MAX.to_le_bytes()),
            1 => {
                // Well-formed output, without end, until the host hangs up.
                let chunk = protocol::encode_data(protocol::Stream::Stdout, &[0x5a; 60 << 10]);
                while conn.write_all(&chunk).is_ok() {}
                Ok(())
            }
            2 => conn.write_all(b"\x0c\0\0\0\x01\0{\"op\": 12}"),
            3 => {
                std::thread::sleep(Duration::from_secs(30));
                Ok(())
            }
            _ => conn.write_all(&protocol::encode_message(&Message::Thaw)),
        };
        std::thread::sleep(Duration::from_millis(100));
    }
}
