//! Helpers shared by the integration tests. Each test binary includes this
//! with `mod common;` and uses what it needs.
#![allow(dead_code)]

pub mod bus;
pub mod host;
pub mod netns;
pub mod qemu;
