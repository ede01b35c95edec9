//! Wire types of the UKey renewal portal protocol, and its OpenAPI document.
