//! The renewal engine: steps, durable journal, checks of issued certificates.
