//! ukey-sim: a PKCS#11 shim over SoftHSM2 adding hot-plug, PIN lockout, faults.
