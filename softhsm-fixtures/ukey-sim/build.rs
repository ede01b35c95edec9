//! Link flags for the PKCS#11 module (the cdylib).

fn main() {
    // The shim keeps SoftHSM2 loaded and initialised from its statics. An application
    // that dlclose()s the shim (cryptoki does when its context is dropped) and loads it
    // again would otherwise get fresh statics facing an already initialised SoftHSM2.
    // `-z nodelete` keeps the one copy for the life of the process, as dlclose()
    // of a real vendor module usually does too.
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
