//! Two hosts: this test process enters one network namespace, `kvtransfer-peer` runs in
//! another, joined by a veth pair (a real network stack between them). Needs root; the test
//! creates and removes the namespaces itself and fails with a clear message if it cannot.

mod common;

use std::process::Command;

use common::scenarios::*;
use common::Net;
use kvtransfer::Backend;

struct Namespaces {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Namespaces {
    /// Creates namespaces `kvt<tag>a`/`kvt<tag>b` joined by veth, 10.77.<subnet>.1 and .2.
    fn create(tag: &str, subnet: u8) -> Namespaces {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        assert_eq!(
            uid, 0,
            "the network-namespace tests need root (ip netns add); run them as root"
        );
        let pid = std::process::id();
        let ns = Namespaces {
            a: format!("kvt{pid}{tag}a"),
            b: format!("kvt{pid}{tag}b"),
        };
        let (va, vb) = (format!("kv{pid}{tag}a"), format!("kv{pid}{tag}b"));
        let (ipa, ipb) = (
            format!("10.77.{subnet}.1/24"),
            format!("10.77.{subnet}.2/24"),
        );
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &ns.a],
            vec!["netns", "add", &ns.b],
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
            vec!["link", "set", &va, "netns", &ns.a],
            vec!["link", "set", &vb, "netns", &ns.b],
            vec!["-n", &ns.a, "addr", "add", &ipa, "dev", &va],
            vec!["-n", &ns.b, "addr", "add", &ipb, "dev", &vb],
            vec!["-n", &ns.a, "link", "set", &va, "up"],
            vec!["-n", &ns.b, "link", "set", &vb, "up"],
            vec!["-n", &ns.a, "link", "set", "lo", "up"],
            vec!["-n", &ns.b, "link", "set", "lo", "up"],
        ];
        for s in steps {
            if let Err(e) = ip(&s) {
                drop(ns);
                panic!("cannot set up the network namespaces: {e}");
            }
        }
        ns
    }

    /// Moves the calling thread (and the threads it starts later) into namespace `a`.
    fn enter_a(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.a))
            .unwrap_or_else(|e| panic!("open namespace {}: {e}", self.a));
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace descriptor; affects this thread only.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        // Like `ip netns exec`: a private mount namespace for this thread with /sys mounted
        // anew, so /sys/class/net lists this namespace's interfaces (UCX reads it).
        let c = |p: &str| std::ffi::CString::new(p).unwrap();
        // SAFETY: unshare/mount/umount2 with valid C strings; they affect this thread (and the
        // threads it starts) only.
        unsafe {
            assert_eq!(
                libc::unshare(libc::CLONE_NEWNS),
                0,
                "unshare(CLONE_NEWNS): {}",
                std::io::Error::last_os_error()
            );
            let root = c("/");
            let none = c("none");
            libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            );
            let sys = c("/sys");
            let sysfs = c("sysfs");
            libc::umount2(sys.as_ptr(), libc::MNT_DETACH);
            let r = libc::mount(
                sysfs.as_ptr(),
                sys.as_ptr(),
                sysfs.as_ptr(),
                0,
                std::ptr::null(),
            );
            assert_eq!(r, 0, "mount sysfs: {}", std::io::Error::last_os_error());
        }
    }

    fn net(&self, subnet: u8) -> Net {
        Net {
            prefix: vec!["ip".into(), "netns".into(), "exec".into(), self.b.clone()],
            local_ip: format!("10.77.{subnet}.1").parse().unwrap(),
            peer_ip: format!("10.77.{subnet}.2").parse().unwrap(),
            ucx: false,
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Each test gets its own pair of namespaces (tests run on parallel threads).
fn with_netns(tag: &str, subnet: u8, f: impl FnOnce(&Net) + Send) {
    with_netns_ucx(tag, subnet, false, f)
}

fn with_netns_ucx(tag: &str, subnet: u8, ucx: bool, f: impl FnOnce(&Net) + Send) {
    if ucx {
        common::ucx_env();
    }
    let ns = Namespaces::create(tag, subnet);
    // Run on a fresh thread so setns never leaks into the test harness's threads.
    let mut net = ns.net(subnet);
    net.ucx = ucx;
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter_a();
            f(&net);
        })
        .join()
        .map_err(|e| std::panic::resume_unwind(e))
        .ok();
    });
    drop(ns);
}

#[test]
fn netns_random_descriptor_lists_tcp() {
    with_netns("r", 1, |net| random_lists(net, Backend::Tcp, 10_000, 21));
}

#[test]
fn netns_killed_target_tcp() {
    with_netns("k", 2, |net| killed_target(net, Backend::Tcp));
}

#[test]
fn netns_killed_initiator_tcp() {
    with_netns("i", 3, |net| killed_initiator(net, "tcp"));
}

#[test]
fn netns_restarted_peer_reconnects_tcp() {
    with_netns("s", 4, |net| restarted_peer(net, &[Backend::Tcp]));
}

/// UCX caches the host's network interfaces once per process: every UCX scenario of this
/// binary runs here, in one pair of namespaces.
#[test]
fn netns_ucx_random_lists_and_killed_target() {
    with_netns_ucx("u", 5, true, |net| {
        random_lists(net, Backend::Ucx, 10_000, 22);
        killed_target(net, Backend::Ucx);
    });
}
