//! DNS discovery against a real DNS server (dnsmasq on loopback): a pool name with one A record
//! per engine, as a Kubernetes headless Service has. Engines are subscribed as their addresses
//! appear, purged when they disappear, and subscribed again when they come back.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, stored, wait_for, Killed};
use kvindex::publish::{EventPublisher, PublisherConfig};
use kvmesh::client::{IndexClient, ScoreRequest};

const HOST: &str = "engines.kvmesh.test";

fn write_hosts(path: &std::path::Path, ips: &[&str]) {
    let mut f = std::fs::File::create(path).unwrap();
    for ip in ips {
        writeln!(f, "{ip} {HOST}").unwrap();
    }
}

#[test]
fn engines_follow_the_dns_records() {
    let dnsmasq = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("dnsmasq is not installed (Debian package dnsmasq-base; tests/run installs it)");
    let dir = std::env::temp_dir().join(format!("kvmesh-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts");
    write_hosts(&hosts, &["127.0.0.2", "127.0.0.3"]);
    let dns_port = free_port();
    let dns = Killed(
        Command::new(dnsmasq)
            .args(["--keep-in-foreground", "--no-resolv", "--no-hosts"])
            .args(["--listen-address=127.0.0.1", "--bind-interfaces"])
            .arg(format!("--port={dns_port}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .args(["--local=/kvmesh.test/", "--local-ttl=0", "--no-negcache"])
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg("--user=root")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq starts"),
    );
    let reload = || {
        let ok = Command::new("kill")
            .args(["-HUP", &dns.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "signalling dnsmasq");
    };

    // Two engines on the same ports of two addresses, as pods behind one Service.
    let (pub_port, replay_port) = (free_port(), free_port());
    let ctx = zmq::Context::new();
    let publisher = |ip: &str| {
        EventPublisher::start(
            &ctx,
            PublisherConfig {
                replay_endpoint: Some(format!("tcp://{ip}:{replay_port}")),
                ..PublisherConfig::new(format!("tcp://{ip}:{pub_port}"))
            },
        )
        .expect("publisher")
    };
    let (p2, p3) = (publisher("127.0.0.2"), publisher("127.0.0.3"));
    let http = free_port();
    let _daemon = Killed(
        Command::new(env!("CARGO_BIN_EXE_kvmesh"))
            .args(["serve", "--grpc-listen", "off", "--model", "m"])
            .args(["--listen", &format!("127.0.0.1:{http}")])
            .arg("--engine-dns")
            .arg(format!("pool={HOST}:{pub_port},replay={replay_port}"))
            .args(["--dns-server", &format!("127.0.0.1:{dns_port}")])
            .args(["--dns-interval-ms", "200"])
            .stdout(Stdio::null())
            .spawn()
            .expect("kvmesh serve starts"),
    );
    let client = IndexClient::new(format!("http://127.0.0.1:{http}"));
    let names = || -> Vec<String> {
        client
            .engines()
            .map(|v| v.into_iter().map(|e| e.name).collect())
            .unwrap_or_default()
    };
    wait_for("both engines to be discovered", || {
        let n = names();
        n.contains(&"pool-127.0.0.2".to_owned()) && n.contains(&"pool-127.0.0.3".to_owned())
    });
    std::thread::sleep(Duration::from_millis(300));
    p2.publish(&stored(&[1], None, 0)).unwrap();
    p3.publish(&stored(&[2], None, 1000)).unwrap();
    let holder = |first: u32| -> Vec<String> {
        client
            .score(&ScoreRequest::tokens("m", (first..first + 32).collect()))
            .map(|v| v.into_iter().map(|e| e.name).collect())
            .unwrap_or_default()
    };
    wait_for("both engines' blocks", || {
        holder(0) == ["pool-127.0.0.2"] && holder(1000) == ["pool-127.0.0.3"]
    });

    // The .3 pod goes away: its engine and its blocks go with it.
    write_hosts(&hosts, &["127.0.0.2"]);
    reload();
    wait_for("the vanished engine to be purged", || {
        !names().contains(&"pool-127.0.0.3".to_owned())
    });
    assert!(holder(1000).is_empty(), "a purged engine's blocks must go");
    assert_eq!(holder(0), ["pool-127.0.0.2"]);

    // It comes back: subscribed again, and its new blocks are seen.
    write_hosts(&hosts, &["127.0.0.2", "127.0.0.3"]);
    reload();
    wait_for("the engine to be discovered again", || {
        names().contains(&"pool-127.0.0.3".to_owned())
    });
    std::thread::sleep(Duration::from_millis(300));
    p3.publish(&stored(&[3], None, 2000)).unwrap();
    wait_for("the returning engine's blocks", || {
        holder(2000) == ["pool-127.0.0.3"]
    });

    // The whole pool vanishes (NXDOMAIN): every engine is purged.
    write_hosts(&hosts, &[]);
    reload();
    wait_for("an empty pool", || names().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
