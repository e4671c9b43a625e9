//! Builds the C tests in ffi/tests/c against the shared library with AddressSanitizer and
//! UBSan and runs them: test_kvmesh.c against a real ZMQ publisher of vLLM KV events,
//! test_store_transfer.c with a scratch directory and a real `redis-server`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvindex::publish::{EventPublisher, PublisherConfig};
use kvindex::{BlockStored, EngineHash, EventBatch, KvEvent, Medium};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where cargo put the shared library: beside this test (`target/debug/deps`, where `cargo test`
/// builds it) or one level up (`target/debug`, after `cargo build`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    let up = deps.parent().unwrap().to_path_buf();
    [deps.clone(), up]
        .into_iter()
        .find(|d| d.join("libkvmesh_ffi.so").exists())
        .unwrap_or(deps)
}

/// Compiles `ffi/tests/c/NAME.c` with the sanitizers; returns the executable.
fn compile(name: &str) -> PathBuf {
    let ffi = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = lib_dir();
    assert!(
        lib_dir.join("libkvmesh_ffi.so").exists(),
        "no libkvmesh_ffi.so in {}",
        lib_dir.display()
    );
    let out = std::env::temp_dir().join(format!("kvmesh-ctest-{name}-{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-std=c11",
            "-D_DEFAULT_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-g",
            "-pthread",
        ])
        .args(["-fsanitize=address,undefined", "-fno-omit-frame-pointer"])
        .arg("-I")
        .arg(ffi.join("include"))
        .arg(ffi.join(format!("tests/c/{name}.c")))
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lkvmesh_ffi", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e}"));
    assert!(status.success(), "the C test {name}.c does not compile");
    out
}

/// Runs a compiled C test under the sanitizers' settings.
fn run_c(exe: &PathBuf, args: &[String]) -> std::process::Output {
    let out = Command::new(exe)
        .args(args)
        // Threads the library leaves running at exit (ZMQ, the runtime) hold allocations that
        // are not leaks of the API; memory errors are what this run is for.
        .env(
            "ASAN_OPTIONS",
            "detect_leaks=0:abort_on_error=0:halt_on_error=1",
        )
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        .output()
        .expect("running the C test");
    let _ = std::fs::remove_file(exe);
    out
}

#[test]
fn c_abi_under_address_sanitizer() {
    let out = compile("test_kvmesh");

    // The engine: publishes blocks of tokens 100..131 again and again while the test runs.
    let ctx = zmq::Context::new();
    let (p, r) = (free_port(), free_port());
    let publ = EventPublisher::start(
        &ctx,
        PublisherConfig {
            replay_endpoint: Some(format!("tcp://127.0.0.1:{r}")),
            ..PublisherConfig::new(format!("tcp://127.0.0.1:{p}"))
        },
    )
    .expect("publisher");
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let batch = EventBatch {
                    ts: 1.0,
                    events: vec![KvEvent::BlockStored(BlockStored {
                        block_hashes: vec![EngineHash(11), EngineHash(12)],
                        parent_block_hash: None,
                        token_ids: (100..132).collect(),
                        block_size: 16,
                        medium: Some(Medium::Gpu),
                        ..Default::default()
                    })],
                    data_parallel_rank: Some(0),
                };
                publ.publish(&batch).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let run = run_c(
        &out,
        &[
            format!("tcp://127.0.0.1:{p}"),
            format!("tcp://127.0.0.1:{r}"),
        ],
    );
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success() && stdout.contains("all C ABI checks passed"),
        "the C test failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
}

/// A throw-away `redis-server` on a free loopback port, killed on drop.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start(dir: &std::path::Path) -> Redis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); install it (Debian: apt-get install redis-server)")
            });
        let mut r = Redis { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = r.child.try_wait() {
                panic!("redis-server exited at start: {st}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn c_store_and_transfer_under_address_sanitizer() {
    let out = compile("test_store_transfer");
    let scratch = std::env::temp_dir().join(format!("kvmesh-ctest-scratch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("redis")).unwrap();
    let redis = Redis::start(&scratch.join("redis"));
    let run = run_c(
        &out,
        &[
            scratch.display().to_string(),
            format!("redis://127.0.0.1:{}/", redis.port),
        ],
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&scratch);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success() && stdout.contains("all store and transfer checks passed"),
        "the C test failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
}
