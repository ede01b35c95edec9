//! Diagnostics of keys, certificates, environment and portal for support staff.
