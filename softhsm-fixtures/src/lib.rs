//! Builds SoftHSM2 tokens that look like real UKeys.
