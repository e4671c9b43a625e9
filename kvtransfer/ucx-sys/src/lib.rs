//! UCX (UCP) bindings for kvmesh, generated with bindgen against the UCX 1.22 headers of the
//! `libucx-cu12` wheel and committed (`regen.sh` regenerates them), so building kvmesh needs
//! neither bindgen nor UCX. `libucp` is opened at run time with [`load`].
#![allow(clippy::all)]

#[allow(
    unsafe_op_in_unsafe_fn,
    clippy::missing_safety_doc,
    clippy::undocumented_unsafe_blocks
)]
mod bindings;
pub use bindings::*;

use std::path::{Path, PathBuf};

/// The minimum UCX version the bindings were generated for.
pub const MIN_MINOR: u32 = 22;

/// Where [`load`] looks when given no path: `$KVTRANSFER_UCX_LIB`, then the loader's search
/// path (`libucp.so.0`).
pub fn candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("KVTRANSFER_UCX_LIB") {
        v.push(PathBuf::from(p));
    }
    v.push(PathBuf::from("libucp.so.0"));
    v
}

/// Opens libucp (UCX >= 1.22) and resolves every function the bindings name.
pub fn load(path: Option<&Path>) -> Result<Ucp, String> {
    let paths = match path {
        Some(p) => vec![p.to_path_buf()],
        None => candidates(),
    };
    let mut errs = Vec::new();
    for p in paths {
        // SAFETY: loading libucp runs its constructors, which only initialise UCX itself.
        match unsafe { Ucp::new(&p) } {
            Ok(lib) => {
                let (mut major, mut minor, mut release) = (0u32, 0u32, 0u32);
                let Ok(get) = lib.ucp_get_version.as_ref() else {
                    errs.push(format!("{}: no ucp_get_version", p.display()));
                    continue;
                };
                // SAFETY: three valid out-pointers.
                unsafe { get(&mut major, &mut minor, &mut release) };
                if major != 1 || minor < MIN_MINOR {
                    errs.push(format!(
                        "{}: UCX {major}.{minor}.{release} is too old (need 1.{MIN_MINOR} or newer)",
                        p.display()
                    ));
                    continue;
                }
                return Ok(lib);
            }
            Err(e) => errs.push(format!("{}: {e}", p.display())),
        }
    }
    Err(format!(
        "UCX (libucp >= 1.{MIN_MINOR}) is not available: {}. Install it with kvtransfer/setup.sh and set KVTRANSFER_UCX_LIB to its libucp.so",
        errs.join("; ")
    ))
}

/// `UCS_PTR_IS_ERR`.
#[inline]
pub fn ptr_is_err(p: ucs_status_ptr_t) -> bool {
    (p as usize) >= (UCS_ERR_LAST as isize as usize)
}

/// `UCS_PTR_IS_PTR`.
#[inline]
pub fn ptr_is_ptr(p: ucs_status_ptr_t) -> bool {
    (p as usize).wrapping_sub(1) < (UCS_ERR_LAST as isize as usize).wrapping_sub(1)
}

/// `UCS_PTR_STATUS`.
#[inline]
pub fn ptr_status(p: ucs_status_ptr_t) -> ucs_status_t {
    p as isize as ucs_status_t
}
