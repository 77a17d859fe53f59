//! Starting confined threads. A thread inherits its creator's filters, so a device
//! worker started by a vCPU (a driver sets DRIVER_OK in a register the vCPU emulates)
//! would be held to the vCPU's list as well as its own. Once the process is confined,
//! every thread is made by one factory thread of the VMM class instead, and enters its
//! own class first thing.

use std::io;
use std::sync::OnceLock;
use std::sync::mpsc::{Sender, channel, sync_channel};
use std::thread::JoinHandle;

use crate::seccomp::{self, ThreadClass};

type Job = Box<dyn FnOnce() + Send>;

static FACTORY: OnceLock<std::sync::Mutex<Sender<Job>>> = OnceLock::new();

/// Starts the factory (once, from a thread in the VMM class).
pub fn start_factory() -> io::Result<()> {
    if FACTORY.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = channel::<Job>();
    std::thread::Builder::new()
        .name("thread-factory".into())
        .spawn(move || {
            for job in rx {
                job();
            }
        })?;
    let _ = FACTORY.set(std::sync::Mutex::new(tx));
    Ok(())
}

/// Starts thread `name` running `f` confined to `class`.
pub fn spawn<F, T>(class: ThreadClass, name: &str, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = std::thread::Builder::new().name(name.to_string());
    let body = move || {
        if let Err(e) = seccomp::enter(class) {
            let name = std::thread::current().name().unwrap_or("?").to_string();
            eprintln!("vessel: seccomp: thread {name}: {e}; the monitor stops");
            std::process::exit(1);
        }
        f()
    };
    let Some(factory) = FACTORY.get() else {
        return builder.spawn(body);
    };
    let (reply, handle) = sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = reply.send(builder.spawn(body));
    });
    factory
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| io::Error::other("the thread factory is gone"))?;
    handle
        .recv()
        .map_err(|_| io::Error::other("the thread factory is gone"))?
}
