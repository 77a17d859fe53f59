#[test]
fn dbg() {
    let mut seeds = vessel_fuzz::vsock_seeds();
    if let Ok(b) = std::fs::read("/tmp/dbg/last") { seeds.push(("last", b)); }
    for (name, b) in seeds {
        eprintln!("== {name}");
        let r = std::panic::catch_unwind(|| vessel_fuzz::vsock_packets_stats(&b));
        eprintln!("{r:?}");
    }
}
