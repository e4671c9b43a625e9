//! NVRTC, loaded at run time: compiles the copy kernel to PTX for the device at hand.
//!
//! The library is looked up as `KVMESH_NVRTC_LIB` if set, then under the usual sonames (CUDA 13,
//! 12 and 11.2+ ship it as `libnvrtc.so.<major>`), then in `$CUDA_HOME/lib64` and
//! `/usr/local/cuda/lib64`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use crate::error::{CudaError, Result};

type Prog = *mut c_void;
type CreateFn = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
type GetFn = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Prog) -> c_int;
type ErrStrFn = unsafe extern "C" fn(c_int) -> *const c_char;

fn candidates() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("KVMESH_NVRTC_LIB") {
        v.push(p);
    }
    for name in [
        "libnvrtc.so",
        "libnvrtc.so.13",
        "libnvrtc.so.12",
        "libnvrtc.so.11.2",
    ] {
        v.push(name.to_string());
    }
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(d) = std::env::var(var) {
            dirs.push(format!("{d}/lib64"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    for d in dirs {
        for name in ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"] {
            v.push(format!("{d}/{name}"));
        }
    }
    v
}

fn load() -> Result<libloading::Library> {
    let tried = candidates();
    for c in &tried {
        // SAFETY: loading NVRTC runs only its own initialisers, which have no preconditions.
        if let Ok(lib) = unsafe { libloading::Library::new(c) } {
            return Ok(lib);
        }
    }
    Err(CudaError::Nvrtc {
        message: format!(
            "libnvrtc not found (tried {}); set KVMESH_NVRTC_LIB",
            tried.join(", ")
        ),
    })
}

fn sym<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T> {
    // SAFETY: each symbol is looked up with the C signature NVRTC documents for it (types above).
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| CudaError::Nvrtc {
            message: format!("symbol {name}: {e}"),
        })
}

/// Compiles `source` to PTX for compute capability `major.minor`.
pub(crate) fn compile_ptx(
    source: &str,
    name: &str,
    major: i32,
    minor: i32,
    defines: &[String],
) -> Result<CString> {
    let lib = load()?;
    let create: CreateFn = sym(&lib, "nvrtcCreateProgram")?;
    let compile: CompileFn = sym(&lib, "nvrtcCompileProgram")?;
    let log_size: SizeFn = sym(&lib, "nvrtcGetProgramLogSize")?;
    let get_log: GetFn = sym(&lib, "nvrtcGetProgramLog")?;
    let ptx_size: SizeFn = sym(&lib, "nvrtcGetPTXSize")?;
    let get_ptx: GetFn = sym(&lib, "nvrtcGetPTX")?;
    let destroy: DestroyFn = sym(&lib, "nvrtcDestroyProgram")?;
    let err_str: ErrStrFn = sym(&lib, "nvrtcGetErrorString")?;

    let fail = |what: &str, code: c_int| {
        // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any code.
        let s = unsafe { CStr::from_ptr(err_str(code)) };
        CudaError::Nvrtc {
            message: format!("{what}: {}", s.to_string_lossy()),
        }
    };
    let src = CString::new(source).map_err(|_| CudaError::Nvrtc {
        message: "kernel source has a NUL byte".into(),
    })?;
    let cname = CString::new(name).map_err(|_| CudaError::Nvrtc {
        message: "kernel name has a NUL byte".into(),
    })?;
    let mut prog: Prog = std::ptr::null_mut();
    // SAFETY: valid out-pointer and NUL-terminated strings; no headers.
    let rc = unsafe {
        create(
            &mut prog,
            src.as_ptr(),
            cname.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail("nvrtcCreateProgram", rc));
    }
    let arch = CString::new(format!("--gpu-architecture=compute_{major}{minor}"))
        .expect("no NUL in a formatted number");
    let defines: Vec<CString> = defines
        .iter()
        .filter_map(|d| CString::new(d.as_str()).ok())
        .collect();
    let mut opts = vec![
        arch.as_ptr(),
        c"--std=c++14".as_ptr(),
        c"-lineinfo".as_ptr(),
    ];
    opts.extend(defines.iter().map(|d| d.as_ptr()));
    // SAFETY: `prog` is a live program and `opts` holds NUL-terminated strings.
    let rc = unsafe { compile(prog, opts.len() as c_int, opts.as_ptr()) };
    let result = if rc != 0 {
        let mut n = 0usize;
        let mut log = String::new();
        // SAFETY: `prog` is live; the buffer has the size NVRTC reported.
        unsafe {
            if log_size(prog, &mut n) == 0 && n > 0 {
                let mut buf = vec![0u8; n];
                if get_log(prog, buf.as_mut_ptr() as *mut c_char) == 0 {
                    log = String::from_utf8_lossy(&buf[..n - 1]).into_owned();
                }
            }
        }
        Err(CudaError::Nvrtc {
            message: format!("{}: {log}", fail("nvrtcCompileProgram", rc)),
        })
    } else {
        let mut n = 0usize;
        // SAFETY: `prog` compiled; the buffer has the size NVRTC reported (NUL included).
        unsafe {
            if ptx_size(prog, &mut n) != 0 || n == 0 {
                Err(CudaError::Nvrtc {
                    message: "nvrtcGetPTXSize failed".into(),
                })
            } else {
                let mut buf = vec![0u8; n];
                let rc = get_ptx(prog, buf.as_mut_ptr() as *mut c_char);
                if rc != 0 {
                    Err(fail("nvrtcGetPTX", rc))
                } else {
                    buf.truncate(n - 1);
                    CString::new(buf).map_err(|_| CudaError::Nvrtc {
                        message: "PTX has a NUL byte".into(),
                    })
                }
            }
        }
    };
    // SAFETY: `prog` is live and destroyed once.
    unsafe { destroy(&mut prog) };
    result
}
