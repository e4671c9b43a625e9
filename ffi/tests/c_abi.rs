//! Builds ffi/tests/c/test_kvmesh.c against the shared library with AddressSanitizer and runs it
//! against a real ZMQ publisher of vLLM KV events.

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

#[test]
fn c_abi_under_address_sanitizer() {
    let ffi = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = lib_dir();
    assert!(
        lib_dir.join("libkvmesh_ffi.so").exists(),
        "no libkvmesh_ffi.so in {}",
        lib_dir.display()
    );
    let out = std::env::temp_dir().join(format!("kvmesh-ctest-{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-std=c11",
            "-D_DEFAULT_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-g",
        ])
        .args(["-fsanitize=address,undefined", "-fno-omit-frame-pointer"])
        .arg("-I")
        .arg(ffi.join("include"))
        .arg(ffi.join("tests/c/test_kvmesh.c"))
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lkvmesh_ffi", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e}"));
    assert!(status.success(), "the C test does not compile");

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
    let run = Command::new(&out)
        .arg(format!("tcp://127.0.0.1:{p}"))
        .arg(format!("tcp://127.0.0.1:{r}"))
        // Threads the library leaves running at exit (ZMQ, the runtime) hold allocations that
        // are not leaks of the API; memory errors are what this run is for.
        .env(
            "ASAN_OPTIONS",
            "detect_leaks=0:abort_on_error=0:halt_on_error=1",
        )
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        .output()
        .expect("running the C test");
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    let _ = std::fs::remove_file(&out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success() && stdout.contains("all C ABI checks passed"),
        "the C test failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
}
