//! `kvtransfer-peer`: one kvtransfer agent in its own process, driven by line commands on
//! stdin. The two-process, network-namespace and benchmark tests start it as the remote peer.
//!
//! ```text
//! kvtransfer-peer --name NAME --size BYTES [--listen IP:PORT] [--advertise IP]
//!                 [--timeout-ms N] [--no-shm] [--ucx] [--seed N]
//! ```
//! Prints `ADDR <listen address>` and `META <hex metadata>`, then answers commands:
//! `load <hex>`, `connect <addr>`, `fill <seed>`, `sum <off> <len>`, `sumdescs <off:len,...>`,
//! `notifs`, `writeloop <remote> <tcp|shm|ucx> <slot bytes> <slots>`, `quit`.

use std::io::{BufRead, Write};
use std::time::Duration;

use kvtransfer::{Agent, AgentConfig, Backend, DescList, HostBuffer, MemKind, Op, UcxData};

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(buf: &HostBuffer, off: usize, len: usize, seed: u64) {
    let mut v = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(&splitmix(seed ^ i.wrapping_mul(0x1000_0000_01b3)).to_le_bytes());
        i += 1;
    }
    buf.write_at(off, &v[..len]).expect("in bounds");
}

fn sum(buf: &HostBuffer, pieces: &[(usize, usize)]) -> Result<u64, String> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for &(off, len) in pieces {
        let mut v = vec![0u8; len];
        buf.read_at(off, &mut v).map_err(|e| e.to_string())?;
        h.update(&v);
    }
    Ok(h.digest())
}

fn backend_of(name: &str) -> Backend {
    match name {
        "tcp" => Backend::Tcp,
        "ucx" => Backend::Ucx,
        _ => Backend::Shm,
    }
}

/// `off:len,off:len,...`
fn parse_pieces(list: &str) -> Result<Vec<(usize, usize)>, String> {
    list.split(',')
        .map(|p| {
            let (o, l) = p.split_once(':').ok_or("want off:len")?;
            Ok((
                o.parse().map_err(|_| "bad off")?,
                l.parse().map_err(|_| "bad len")?,
            ))
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("odd hex".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

fn main() {
    if let Err(e) = run() {
        eprintln!("kvtransfer-peer: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut cfg = AgentConfig::new("peer");
    let mut size = 64usize << 20;
    let mut seed = 1u64;
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--name" => cfg.name = val()?,
            "--size" => size = val()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--seed" => seed = val()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--listen" => cfg.listen = val()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--advertise" => {
                cfg.advertise = Some(val()?.parse().map_err(|e| format!("--advertise: {e}"))?)
            }
            "--timeout-ms" => {
                cfg.timeout =
                    Duration::from_millis(val()?.parse().map_err(|e| format!("--timeout-ms: {e}"))?)
            }
            "--no-shm" => cfg.shm = false,
            "--ucx" => cfg.ucx = true,
            "--ucx-data" => {
                cfg.ucx_data = match val()?.as_str() {
                    "auto" => UcxData::Auto,
                    "rma" => UcxData::Rma,
                    "am" => UcxData::ActiveMessages,
                    v => return Err(format!("--ucx-data {v}: want auto, rma or am")),
                }
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    let agent = Agent::new(cfg).map_err(|e| e.to_string())?;
    let buf = HostBuffer::new(size).map_err(|e| e.to_string())?;
    fill(&buf, 0, size, seed);
    agent.register(&buf).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ADDR {}", agent.listen_addr()).ok();
    writeln!(out, "BASE {}", buf.addr()).ok();
    writeln!(out, "META {}", hex(&agent.export_metadata())).ok();
    out.flush().ok();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let reply = match w.as_slice() {
            ["quit"] => return Ok(()),
            ["load", h] => unhex(h)
                .and_then(|b| agent.load_remote(&b).map_err(|e| e.to_string()))
                .map(|n| format!("OK {n}")),
            ["connect", a] => a
                .parse()
                .map_err(|e| format!("{e}"))
                .and_then(|a| agent.connect(a).map_err(|e| e.to_string()))
                .map(|n| format!("OK {n}")),
            ["fill", s] => s.parse().map_err(|e| format!("{e}")).map(|s| {
                fill(&buf, 0, size, s);
                "OK".to_string()
            }),
            ["sum", o, l] => match (o.parse(), l.parse()) {
                (Ok(o), Ok(l)) => sum(&buf, &[(o, l)]).map(|s| format!("SUM {s:016x}")),
                _ => Err("bad numbers".into()),
            },
            ["sumdescs", list] => parse_pieces(list)
                .and_then(|p| sum(&buf, &p))
                .map(|s| format!("SUM {s:016x}")),
            // Reads the pieces from the remote's first region into the same offsets here, then
            // answers their checksum here.
            ["readsum", remote, backend, list] => (|| {
                let pieces = parse_pieces(list)?;
                let md = agent.remote_metadata(remote).ok_or("unknown remote")?;
                let rbase = md.regions.first().ok_or("remote has no region")?.addr;
                let mut l = DescList::new(MemKind::Dram);
                let mut r = DescList::new(MemKind::Dram);
                for &(o, n) in &pieces {
                    l.push(buf.addr() + o as u64, n as u64, 0);
                    r.push(rbase + o as u64, n as u64, 0);
                }
                let h = agent
                    .prepare(Op::Read, &l, remote, &r, Some(backend_of(backend)))
                    .map_err(|e| e.to_string())?;
                h.post(None).map_err(|e| e.to_string())?;
                h.wait_timeout(Duration::from_secs(30))
                    .map_err(|e| e.to_string())?;
                sum(&buf, &pieces).map(|s| format!("SUM {s:016x}"))
            })(),
            ["notifs"] => {
                let n = agent.get_notifs();
                let mut s = format!("NOTIFS {}", n.len());
                for x in n {
                    s.push_str(&format!(
                        "\nN {} {}",
                        x.from,
                        String::from_utf8_lossy(&x.msg)
                    ));
                }
                Ok(s)
            }
            [cmd @ ("writeloop" | "readloop"), remote, backend, slot, slots] => {
                let backend = backend_of(backend);
                let slot: usize = slot.parse().map_err(|_| "bad slot")?;
                let slots: usize = slots.parse().map_err(|_| "bad slots")?;
                let md = agent.remote_metadata(remote).ok_or("unknown remote")?;
                let rbase = md.regions.first().ok_or("remote has no region")?.addr;
                writeln!(out, "STARTED").ok();
                out.flush().ok();
                // Writes (or reads) slot after slot until killed; each write's notification
                // names the slot and the checksum of what was written there.
                let write = *cmd == "writeloop";
                let mut k = 0u64;
                loop {
                    let s = (k as usize) % slots;
                    let off = (s % (size / slot)) * slot;
                    let mut l = DescList::new(MemKind::Dram);
                    l.push(buf.addr() + off as u64, slot as u64, 0);
                    let mut r = DescList::new(MemKind::Dram);
                    r.push(rbase + (s * slot) as u64, slot as u64, 0);
                    let op = if write { Op::Write } else { Op::Read };
                    let h = agent
                        .prepare(op, &l, remote, &r, Some(backend))
                        .map_err(|e| e.to_string())?;
                    let msg = if write {
                        fill(&buf, off, slot, k);
                        let ck = sum(&buf, &[(off, slot)])?;
                        Some(format!("{k} {} {slot} {ck:016x}", s * slot))
                    } else {
                        None
                    };
                    h.post(msg.as_ref().map(|m| m.as_bytes()))
                        .map_err(|e| e.to_string())?;
                    h.wait_timeout(Duration::from_secs(30))
                        .map_err(|e| e.to_string())?;
                    k += 1;
                }
            }
            _ => Err(format!("unknown command {line:?}")),
        };
        match reply {
            Ok(s) => writeln!(out, "{s}").ok(),
            Err(e) => writeln!(out, "ERR {e}").ok(),
        };
        out.flush().ok();
    }
    Ok(())
}
