//! The committed C header must be what cbindgen makes of the code now.
//! `KVMESH_BLESS=1 cargo test -p kvmesh-ffi --test header` rewrites it.

#[test]
fn committed_header_matches_the_code() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    let path = dir.join("include/kvmesh.h");
    if std::env::var_os("KVMESH_BLESS").is_some() {
        std::fs::write(&path, &out).expect("writing the header");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == out,
        "ffi/include/kvmesh.h is stale: run KVMESH_BLESS=1 cargo test -p kvmesh-ffi --test header"
    );
}
