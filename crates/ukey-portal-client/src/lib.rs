//! HTTPS client of the renewal portal protocol.
