//! Integration tests of the renewal engine (one binary, modules per theme).

#![allow(dead_code)]

mod renewal {
    pub mod common;
    pub mod e2e;
    pub mod refusal;
    pub mod refusal_sm2;
    pub mod resume;
    pub mod shared_id;
}
