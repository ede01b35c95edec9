//! The only crate that touches PKCS#11: modules, slots, tokens, objects, watcher.
